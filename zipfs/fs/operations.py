"""pyfuse3 operations on trio: the read path and metadata; on their own, a read-only mount
(content is read-only; names can be removed). zipfs.fs.writes adds the write path.

One trio thread runs every handler, so nothing here blocks it: metadata reads and chunk decodes
run in worker threads; a read whose chunks are all cached returns without awaiting. Concurrent
readers of one chunk share one decode job. Prefetch (sequential read-ahead, and tensor-aware:
the first read inside a tensor queues the rest of that tensor) runs in background tasks.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from zipfs.errors import NotFoundError, ZipfsError
from zipfs.fs.namespace import FILE_BIT, ROOT_INO, Entry, Namespace, OpenFile
from zipfs.read.chunks import ChunkSource
from zipfs.store.lifecycle import remove
from zipfs.store.records import FILE

log = logging.getLogger("zipfs.mount")
T = TypeVar("T")

#: a stored file's inode never changes content (a new version is a new inode): cache it long
STORED_ATTR_TIMEOUT = 300.0
#: names can change under us (`zipfs ingest` or `rm` from the CLI while mounted); so can
#: directories, links and staged files: the kernel revalidates them after this long
ENTRY_TIMEOUT = 1.0
#: the most a tensor-aware prefetch queues at once, in bytes
TENSOR_PREFETCH_MAX = 64 << 20
#: sequential read-ahead, in bytes, once a handle reads sequentially
SEQUENTIAL_AHEAD = 8 << 20
#: how far behind the furthest read a read may start and still count as sequential
SEQUENTIAL_SLACK = 4 << 20
#: chunks whose served bytes are counted at once (see Operations._served_bytes)
SERVED_TRACKED = 4096


@dataclass
class Handle:
    """One open file: its extent index in RAM and what prefetch knows of how it is read."""

    file: OpenFile
    #: the furthest offset a read of this handle reached (sequential detection)
    next_off: int = -1
    seen_tensors: set[int] = field(default_factory=set)
    tensor_starts: list[int] = field(default_factory=list)


class _Job:
    """One in-flight chunk decode; every reader of that chunk waits on the same job."""

    __slots__ = ("event", "result", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: bytes | None = None
        self.error: ZipfsError | None = None


@dataclass
class MountStats:
    reads: int = 0
    bytes_read: int = 0
    prefetch_queued: int = 0
    prefetch_decoded: int = 0
    eio: int = 0


class Operations(pyfuse3.Operations):
    """Read-only FUSE operations over a Namespace and a ChunkSource."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, ns: Namespace, source: ChunkSource, workers: int) -> None:
        super().__init__()
        self.ns = ns
        self.source = source
        self.cache = source.cache
        self.workers = workers
        self.limiter = trio.CapacityLimiter(workers)
        #: prefetch decodes in its own threads: a demand read never waits for a prefetch's token.
        #: Twice the workers, so one waiting for its payload to come off the disk leaves a core
        #: to another
        self.prefetchers = 2 * workers
        self.prefetch_limiter = trio.CapacityLimiter(self.prefetchers)
        self.stats = MountStats()
        self._inflight: dict[int, _Job] = {}
        self._served: dict[int, int] = {}
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list[tuple[str, Entry]]] = {}
        self._next_fh = 1
        self._prefetch_q: deque[int] = deque()
        self._prefetch_set: set[int] = set()
        self._prefetch_wake = trio.Event()
        self._prefetch_max = max(4, source.cache.capacity // (2 << 20))
        self._uid, self._gid = os.getuid(), os.getgid()

    # ---- helpers ----

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call in a worker thread; map store errors to errno."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except ZipfsError as e:
            log.error("store error: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _attr(self, e: Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = e.ino
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = STORED_ATTR_TIMEOUT if e.kind == FILE else ENTRY_TIMEOUT
        a.st_mode = e.mode
        a.st_nlink = 2 if e.is_dir else 1
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_size = e.size
        a.st_blksize = 1 << 20
        a.st_blocks = (e.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        return a

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # ---- metadata ----

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if text == ".":
            return await self.getattr(parent_inode, ctx)
        if text == "..":
            parent = self.ns.dir_path(parent_inode).rpartition("/")[0]
            return await self.getattr(self.ns.path_ino(parent), ctx)
        entry = await self._thread(self.ns.lookup, parent_inode, text)
        if entry is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = ENTRY_TIMEOUT
            return neg
        return self._attr(entry)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(await self._thread(self.ns.entry, inode))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._new_fh()
        self._dirs[fh] = await self._thread(self.ns.listdir, inode)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, entry = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(entry), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await trio.to_thread.run_sync(os.statvfs, str(self.ns.store.path))
        data = self.ns.store.path / "lmdb" / "data.mdb"
        used = (await trio.to_thread.run_sync(os.stat, data)).st_blocks * 512
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = st.f_frsize
        # size = what the store uses + what it may still use; df's "Used" is then the store itself
        s.f_bavail = s.f_bfree = st.f_bavail
        s.f_blocks = used // st.f_frsize + st.f_bavail
        s.f_files, s.f_ffree, s.f_favail = st.f_files, st.f_ffree, st.f_favail
        s.f_namemax = 255
        return s

    # ---- xattrs: mount statistics on the root, state and sha256 on files ----

    def stats_json(self) -> dict[str, Any]:
        return {
            "reads": self.stats.reads, "bytes_read": self.stats.bytes_read,
            "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
            "cache_bytes": self.cache.size, "cache_capacity": self.cache.capacity,
            "buffers_mapped": self.source.pool.mapped, "buffers_in_use": self.source.pool.in_use,
            "chunks_decoded": self.source.decoded, "bytes_decoded": self.source.decoded_bytes,
            "decode_seconds": round(self.source.decode_seconds, 3),
            "prefetch_queued": self.stats.prefetch_queued, "prefetch_decoded": self.stats.prefetch_decoded,
            "eio": self.stats.eio, "open_files": len(self._handles), "inflight": len(self._inflight),
            "workers": self.workers,
        }

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == ROOT_INO:
            return [b"user.zipfs.stats"]
        kind = (await self.getattr(inode, ctx)).st_mode
        return [b"user.zipfs.state", b"user.zipfs.sha256"] if stat.S_ISREG(kind) else []

    def file_state(self, inode: int) -> str | None:
        """user.zipfs.state of a file inode: stored, or (writable mounts) staged / ingesting."""
        return "stored" if self.ns.resolve(inode) & FILE_BIT else None

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INO and name == b"user.zipfs.stats":
            return json.dumps(self.stats_json()).encode()
        state = self.file_state(inode)
        if state is not None and name == b"user.zipfs.state":
            return state.encode()
        if state == "stored" and name == b"user.zipfs.sha256":
            sha = await self._thread(self.ns.sha256, inode)
            return sha.encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    # ---- the read path ----

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        f = await self._thread(self.ns.open, inode)
        fh = self._new_fh()
        self._handles[fh] = Handle(f, tensor_starts=[t.start for t in f.tensors])
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handles[fh]
        parts = []
        for cid, lo, hi in h.file.layout.extents(off, size):
            data = self.cache.get(cid)
            if data is None:
                try:
                    data = await self._chunk(cid)
                except ZipfsError as e:
                    self.stats.eio += 1
                    log.error("EIO reading %s at offset %d (chunk %d): %s", h.file.path, off, cid, e)
                    raise pyfuse3.FUSEError(errno.EIO) from None
            parts.append(memoryview(data)[lo:hi])
            self._served_bytes(cid, hi - lo, len(data))
        self.stats.reads += 1
        out = b"".join(parts)
        self.stats.bytes_read += len(out)
        self._plan_prefetch(h, off, len(out))
        return out

    def _served_bytes(self, cid: int, n: int, size: int) -> None:
        """Count bytes of a chunk handed to the kernel; once all of them were, the page cache
        holds the chunk and the decoded copy goes to the cache's cold list (its memory is then
        the first reused). Readahead requests complete out of order, so this counts bytes
        rather than watching for sequential offsets."""
        served = self._served.pop(cid, 0) + n
        if served >= size:
            self.cache.demote(cid)
            return
        if len(self._served) >= SERVED_TRACKED:  # partly read chunks of random access: forget them
            self._served.clear()
        self._served[cid] = served

    async def _chunk(self, cid: int, limiter: trio.CapacityLimiter | None = None) -> bytes:
        """Decoded chunk cid; concurrent callers share one decode job."""
        job = self._inflight.get(cid)
        if job is None:
            job = self._inflight[cid] = _Job()
            try:
                job.result = await trio.to_thread.run_sync(self.source.get, cid,
                                                            limiter=limiter or self.limiter)
            except ZipfsError as e:
                job.error = e
            finally:
                del self._inflight[cid]
                job.event.set()
        else:
            await job.event.wait()
        if job.error is not None:
            raise job.error
        return job.result

    # ---- prefetch ----

    def _queue_range(self, h: Handle, start: int, end: int) -> None:
        for cid, _, _ in h.file.layout.extents(start, end - start):
            if cid in self._prefetch_set or cid in self._inflight or cid in self.cache:
                continue
            self._prefetch_q.append(cid)
            self._prefetch_set.add(cid)
            self.stats.prefetch_queued += 1
            if len(self._prefetch_q) > self._prefetch_max:  # stale entries go first
                self._prefetch_set.discard(self._prefetch_q.popleft())
        # wake every idle worker, then give later waits a fresh event
        self._prefetch_wake.set()
        self._prefetch_wake = trio.Event()

    def _plan_prefetch(self, h: Handle, off: int, size: int) -> None:
        end = off + size
        # kernel readahead sends several requests at once and they complete in any order, so a
        # read counts as sequential when it starts near the furthest point read so far
        if h.next_off - SEQUENTIAL_SLACK <= off <= h.next_off and end < h.file.layout.size:
            ahead = max(end, h.next_off)
            self._queue_range(h, ahead, min(h.file.layout.size, ahead + SEQUENTIAL_AHEAD))
        h.next_off = max(h.next_off, end) if off <= h.next_off else end
        i = bisect.bisect_right(h.tensor_starts, off) - 1
        if i >= 0 and i not in h.seen_tensors and off < h.file.tensors[i].end:
            h.seen_tensors.add(i)
            t = h.file.tensors[i]
            self._queue_range(h, end, min(t.end, end + TENSOR_PREFETCH_MAX))

    async def prefetch_worker(self) -> None:
        """Decode queued chunks into the cache; several of these run for the mount's lifetime."""
        while True:
            if not self._prefetch_q:
                await self._prefetch_wake.wait()
                continue
            cid = self._prefetch_q.popleft()
            self._prefetch_set.discard(cid)
            if cid in self._inflight or cid in self.cache:
                continue
            try:
                await self._chunk(cid, self.prefetch_limiter)
                self.stats.prefetch_decoded += 1
            except ZipfsError as e:  # a demand read of it reports the error to its reader
                log.warning("prefetch of chunk %d failed: %s", cid, e)

    # ---- removing names: the same operation as `zipfs rm` ----

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        entry = await self._thread(self.ns.lookup, parent_inode, os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await self._thread(remove, self.ns.store, [entry.path])
        self.removed(entry)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        entry = await self._thread(self.ns.lookup, parent_inode, os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if await self._thread(self.ns.listdir, entry.ino):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        await self._thread(remove, self.ns.store, [entry.path])
        self.removed(entry)

    def removed(self, entry: Entry) -> None:
        """A name is gone from the store: forget what the mount kept about it."""
        self.ns.forget(entry.path)

    # ---- a read-only mount (zipfs.fs.writes adds the write path) ----

    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    create = mkdir = mknod = symlink = link = rename = _read_only
    write = setattr = setxattr = removexattr = _read_only
