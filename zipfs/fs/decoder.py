"""Chunk decodes for the mount, in threads of their own that take chunk ids off two queues.

A decode handed to a worker with `trio.to_thread.run_sync` costs the trio thread a few hundred
microseconds of bookkeeping and two thread switches, about as much per 1 MiB chunk as moving its
bytes through FUSE. Here the trio thread only appends ids to a queue: the threads take demand
reads first, then prefetch, put what they decode in the cache, and wake the trio thread only
for a chunk somebody waits on. Concurrent readers of a chunk share one job (in-flight
de-duplication, as in DwarFS's block cache).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterable

import trio

from zipfs.errors import CorruptChunkError, StoreError, ZipfsError
from zipfs.read.chunks import ChunkSource

log = logging.getLogger("zipfs.mount")

#: queued chunks whose payloads are read ahead of their decode
ADVISE_AHEAD = 16


class _Job:
    """One chunk queued for or being decoded; its waiters share the result."""

    __slots__ = ("event", "result", "error", "waiters")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: bytes | memoryview | None = None
        self.error: ZipfsError | None = None
        self.waiters = 0


class Decoder:
    """Decode threads over a ChunkSource: `get` for a read that needs a chunk now, `prefetch`
    for chunks a read will need. Thread-safe queues, one lock; the trio thread never waits on
    anything but that lock's short sections."""

    def __init__(self, source: ChunkSource, threads: int, prefetch_max: int, demand_threads: int = 0,
                 advise_ahead: int = ADVISE_AHEAD) -> None:
        self.source = source
        #: queued chunks whose payloads are asked for ahead of their decode (deeper for a store
        #: whose payloads come from a bucket: each fetch waits a round trip)
        self.advise_ahead = advise_ahead
        #: threads that take demand reads, then prefetch; and threads only for demand reads, so a
        #: read that needs a chunk now never waits for prefetches to finish (a model loaded by
        #: page faults jumps between tensors, each jump queueing a tensor's worth of prefetch)
        self.threads = threads
        self.demand_threads = demand_threads
        #: queued prefetch ids beyond this drop the oldest (a reader that jumped away left them)
        self.prefetch_max = prefetch_max
        self.prefetch_queued = 0
        self.prefetch_decoded = 0
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # threads that prefetch too wait here
        self._demand_cv = threading.Condition(lock)  # demand-only threads here
        self._demand: deque[int] = deque()
        self._prefetch: deque[int] = deque()
        self._prefetch_set: set[int] = set()
        #: queued prefetch ids whose payloads were asked of the disk already
        self._advised: set[int] = set()
        #: jobs queued for a demand read or running, by chunk id
        self._jobs: dict[int, _Job] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        """Start the threads; call on the trio thread (its results are delivered there)."""
        self._token = trio.lowlevel.current_trio_token()
        for i in range(self.threads + self.demand_threads):
            demand_only = i >= self.threads
            t = threading.Thread(target=self._run, args=(demand_only,), name=f"zipfs-decode-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            self._demand_cv.notify_all()
        for t in self._workers:  # the store closes after this: no decode may still be using it
            while t.is_alive():
                try:
                    t.join()
                except KeyboardInterrupt:  # a second Ctrl-C: we are stopping already
                    continue

    @property
    def inflight(self) -> int:
        return len(self._jobs)

    async def get(self, cid: int) -> bytes | memoryview:
        """Decoded chunk cid (decoded now, or by the job already queued or running for it)."""
        with self._cv:
            job = self._jobs.get(cid)
            if job is None:
                job = self._jobs[cid] = _Job()
                self._demand.append(cid)
                self._demand_cv.notify()  # and one of the others, in case those are all busy
                self._cv.notify()
            job.waiters += 1
        await job.event.wait()
        if job.error is not None:
            raise job.error
        if job.result is None:
            raise CorruptChunkError(f"decoding chunk {cid} was cancelled")
        return job.result

    def prefetch(self, cids: Iterable[int]) -> None:
        """Queue chunks to decode into the cache when no demand read is waiting."""
        cache = self.source.cache
        with self._cv:
            added = 0
            for cid in cids:
                if cid in self._prefetch_set or cid in self._jobs or cid in cache:
                    continue
                self._prefetch.append(cid)
                self._prefetch_set.add(cid)
                added += 1
                if len(self._prefetch) > self.prefetch_max:
                    stale = self._prefetch.popleft()
                    self._prefetch_set.discard(stale)
                    self._advised.discard(stale)
            if added:
                self.prefetch_queued += added
                self._cv.notify(added)

    def _next(self, demand_only: bool) -> tuple[int, _Job, bool, list[int]] | None:
        """The next (chunk id, job, is prefetch, queued ids to advise) to decode, waiting for
        one; None once closed."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                if self._demand:
                    cid = self._demand.popleft()
                    return cid, self._jobs[cid], False, self._to_advise()
                while self._prefetch and not demand_only:
                    cid = self._prefetch.popleft()
                    self._prefetch_set.discard(cid)
                    self._advised.discard(cid)
                    if cid not in self._jobs and cid not in self.source.cache:
                        job = self._jobs[cid] = _Job()
                        return cid, job, True, self._to_advise()
                if not self._prefetch:
                    self._advised.clear()
                (self._demand_cv if demand_only else self._cv).wait()

    def _to_advise(self) -> list[int]:
        """The first queued prefetch ids not yet advised, so their payloads come off the disk
        while the chunks before them decode (under the lock)."""
        ids = []
        for cid in itertools.islice(self._prefetch, self.advise_ahead):
            if cid not in self._advised:
                self._advised.add(cid)
                ids.append(cid)
        return ids

    def _run(self, demand_only: bool) -> None:
        while (item := self._next(demand_only)) is not None:
            cid, job, prefetched, advise = item
            try:
                self._decode(cid, job, prefetched, advise)
            finally:  # whatever happened, the job ends and its waiters wake
                with self._cv:
                    del self._jobs[cid]
                    waited = job.waiters > 0
                    if prefetched and job.error is None:
                        self.prefetch_decoded += 1
                if waited:
                    try:
                        self._token.run_sync_soon(job.event.set)
                    except trio.RunFinishedError:  # the mount is shutting down: nobody to wake
                        pass

    def _decode(self, cid: int, job: _Job, prefetched: bool, advise: list[int]) -> None:
        if advise:
            try:
                self.source.advise(advise)
            except Exception as e:  # noqa: BLE001 - only a hint; the decode of each reports damage
                log.debug("reading ahead chunks %s: %s", advise[:4], e)
        try:
            job.result = self.source.get(cid)
        except ZipfsError as e:
            job.error = e
            if prefetched:  # a demand read of it reports the error to its reader
                log.warning("prefetch of chunk %d failed: %s", cid, e)
        except BaseException as e:  # noqa: BLE001 - every waiter gets an error, never nothing
            log.exception("decoding chunk %d failed", cid)
            job.error = StoreError(f"decoding chunk {cid} failed: {e}")
