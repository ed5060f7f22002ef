"""The mount's write path: staging files, the journal, background ingest.

create/write go to `staging/<sid>` under the store, keyed by staging id, not path. flush and
fsync fsync the staging file and commit its journal row before returning, and report errors
there (the kernel ignores release's). A failed write or fsync poisons the file: every later
write, flush and fsync of it reports that error (ENOSPC stays ENOSPC through close), opening it
again gets EIO, and a poisoned file never acknowledged is removed at its last close.

After the last writer closes, the file is queued (FIFO) for background ingest in its own thread
and limiter, so reads stay fast; until the ingest commits, reads come from staging. Opening a
stored file for writing copies it up into staging first. Writes wait (backpressure) while
staging is over its budget and the ingest queue can make room; nothing staged is evicted.

The kernel is never asked to invalidate entries: a mount killed while its invalidation thread
waits for a directory lock that a rename (waiting on this very mount) holds can never exit, and
its mount point hangs (seen in the crash test). A file that changes form keeps its old inode
working instead (Namespace.moved), and entries expire after a second.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from zipfs import faults
from zipfs.errors import NamespaceError, NotFoundError, ZipfsError
from zipfs.fs.namespace import FILE_BIT, STAGED_BIT, Entry, Namespace
from zipfs.fs.operations import Operations
from zipfs.ingest.base import BaseChoice
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.staged import ingest_staged
from zipfs.read.chunks import ChunkSource
from zipfs.read.reader import Reader
from zipfs.store import mutate, staging
from zipfs.store.lifecycle import remove
from zipfs.store.records import LINK, STAGED

log = logging.getLogger("zipfs.mount")
T = TypeVar("T")

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


@dataclass(eq=False)
class StagedFile:
    """A staged file as the mount knows it: its live size, its writers, its ingest state."""

    sid: int
    path: Path
    size: int
    mtime_ns: int
    acked: bool
    fd: int = -1
    opens: int = 0
    writers: int = 0
    #: writes since the last acknowledged flush, counted so a flush racing a write stays dirty
    writes: int = 0
    acked_writes: int = 0
    state: str = "staged"  # staged | queued | ingesting | failed
    failure: str = ""
    #: errno of a failed write or fsync: the file is poisoned
    error: int = 0
    ingest_ended: trio.Event | None = None

    @property
    def dirty(self) -> bool:
        return self.writes != self.acked_writes or not self.acked


@dataclass
class StagedHandle:
    sf: StagedFile
    writable: bool


@dataclass
class WriteStats:
    bytes_written: int = 0
    ingested_files: int = 0
    ingested_bytes: int = 0
    ingest_failures: int = 0
    backpressure_waits: int = 0


def _errno_of(e: ZipfsError) -> int:
    if isinstance(e, NamespaceError):
        return e.errno
    if isinstance(e, NotFoundError):
        return errno.ENOENT
    return errno.ENOSPC if "no space left" in str(e) else errno.EIO


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WritableOperations(Operations):
    """The read path plus create/write/rename/..., staging and background ingest."""

    def __init__(self, ns: Namespace, source: ChunkSource, workers: int, ingester: Ingester,
                 staging_limit: int, recovered: dict[int, staging.StagedRecord]) -> None:
        super().__init__(ns, source, workers)
        self.store = ns.store
        self.ingester = ingester
        self.staging_limit = staging_limit
        self.wstats = WriteStats()
        self.staged: dict[int, StagedFile] = {}
        self._shandles: dict[int, StagedHandle] = {}
        self._queue: deque[int] = deque()
        self._queue_wake = trio.Event()
        self._space = trio.Event()
        #: journal commits and staging I/O wait on disks, not CPUs: their own threads
        self.io_limiter = trio.CapacityLimiter(8)
        self.ingest_limiter = trio.CapacityLimiter(1)
        self._bases: dict[str, BaseChoice] = {}
        ns.staged_attrs = self._staged_attrs
        for sid, rec in sorted(recovered.items()):  # FIFO: oldest first
            sf = self.staged[sid] = StagedFile(sid, staging.staging_path(self.store, sid), rec.size,
                                               rec.mtime_ns, acked=True)
            self._enqueue(sf)

    # ---- helpers ----

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking I/O or a journal commit in a thread; errors become errnos."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)
        except ZipfsError as e:
            if not isinstance(e, NamespaceError):
                log.error("%s", e)
            raise pyfuse3.FUSEError(_errno_of(e)) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def _commit(self, op: Callable[..., Any]) -> Any:
        return await self._io(self.store.writer.call, op)

    def _staged_attrs(self, sid: int) -> tuple[int, int] | None:
        sf = self.staged.get(sid)
        return (sf.size, sf.mtime_ns) if sf is not None else None

    def _child(self, parent: int, name: bytes) -> str:
        try:
            return self.ns.child_path(parent, os.fsdecode(name))
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except ZipfsError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def _entry_attr(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        entry = await self._thread(self.ns.lookup, parent, os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(entry)

    def _space_changed(self) -> None:
        self._space.set()
        self._space = trio.Event()

    def _staged_bytes(self) -> int:
        return sum(sf.size for sf in self.staged.values())

    def _check(self, sf: StagedFile) -> None:
        """Refuse writes to a poisoned file with the error that poisoned it."""
        if sf.error:
            raise pyfuse3.FUSEError(sf.error)

    def _poison(self, sf: StagedFile, err: int, what: str) -> pyfuse3.FUSEError:
        sf.error = sf.error or err
        log.error("staged file #%d: %s failed: %s; the file is poisoned", sf.sid, what, os.strerror(err))
        return pyfuse3.FUSEError(err)

    def _fd(self, sf: StagedFile) -> int:
        if sf.fd < 0:
            sf.fd = os.open(sf.path, os.O_RDWR)
        return sf.fd

    def _close_if_unused(self, sf: StagedFile) -> None:
        # while ingesting, the descriptor outlives the staging file (deleted at the commit), so
        # opens racing the commit still read the bytes
        if sf.opens == 0 and sf.fd >= 0 and sf.state != "ingesting":
            os.close(sf.fd)
            sf.fd = -1

    # ---- statistics and state ----

    def stats_json(self) -> dict[str, Any]:
        out = super().stats_json()
        states = [sf.state for sf in self.staged.values()]
        out.update({
            "staged_files": len(self.staged), "staged_bytes": self._staged_bytes(),
            "staging_limit": self.staging_limit, "queued": states.count("queued"),
            "ingesting": states.count("ingesting"), "failed": states.count("failed"),
            "open_for_write": sum(1 for sf in self.staged.values() if sf.writers),
            "ingested_files": self.wstats.ingested_files, "ingested_bytes": self.wstats.ingested_bytes,
            "ingest_failures": self.wstats.ingest_failures, "bytes_written": self.wstats.bytes_written,
            "backpressure_waits": self.wstats.backpressure_waits,
        })
        return out

    def file_state(self, inode: int) -> str | None:
        ino = self.ns.resolve(inode)
        if not ino & STAGED_BIT:
            return super().file_state(inode)
        sf = self._staged_of(ino)
        if sf is None:
            return None
        if sf.error:
            return f"staged (write failed: {os.strerror(sf.error)})"
        if sf.state == "failed":
            return f"staged (ingest failed: {sf.failure})"
        return "ingesting" if sf.state == "ingesting" else "staged"

    # ---- namespace changes ----

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._commit(mutate.mkdir(self.store, self._child(parent_inode, name)))
        return await self._entry_attr(parent_inode, name)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._commit(mutate.symlink(self.store, self._child(parent_inode, name), target))
        return await self._entry_attr(parent_inode, name)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        entry = await self._thread(self.ns.entry, inode)
        if entry.kind != LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        dead: list[int] = []
        await self._commit(mutate.rename(self.store, old, new, bool(flags & RENAME_NOREPLACE), dead))
        for sid in dead:
            self._discard(sid)
        await self._io(staging.purge, self.store, dead)
        self.ns.forget(new)
        self.ns.renamed(old, new)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # hard links: a model file has one name

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # devices, fifos and sockets have no place here

    def removed(self, entry: Entry) -> None:
        super().removed(entry)
        if entry.kind == STAGED:
            self._discard(entry.ino & ~STAGED_BIT)

    def _discard(self, sid: int) -> None:
        """A staged file's name is gone; open handles keep reading their descriptor."""
        sf = self.staged.pop(sid, None)
        if sf is not None:
            sf.state = "removed"
            self._space_changed()

    # ---- creating and opening ----

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        sid = await self._commit(lambda txn: staging.create(txn, self.store, path))
        spath = staging.staging_path(self.store, sid)
        fd = await self._io(os.open, spath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        sf = self.staged[sid] = StagedFile(sid, spath, 0, time.time_ns(), acked=False, fd=fd)
        self.ns.remember(STAGED_BIT | sid, path)
        fh = self._open_handle(sf, writable=True)
        entry = Entry(STAGED_BIT | sid, STAGED, 0, sf.mtime_ns, path)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False), self._attr(entry)

    def _open_handle(self, sf: StagedFile, writable: bool) -> int:
        fh = self._new_fh()
        self._shandles[fh] = StagedHandle(sf, writable)
        sf.opens += 1
        sf.writers += writable
        return fh

    def _staged_of(self, ino: int) -> StagedFile | None:
        """The live staged file of a resolved inode, or None."""
        return self.staged.get(ino & ~STAGED_BIT) if ino & STAGED_BIT else None

    async def _settled(self, inode: int) -> tuple[int, StagedFile | None]:
        """inode resolved once no ingest of it runs (it is then stored, or staged again)."""
        while True:
            ino = self.ns.resolve(inode)
            sf = self._staged_of(ino)
            if sf is None or sf.state != "ingesting":
                return ino, sf
            await sf.ingest_ended.wait()

    async def _writable(self, inode: int, truncate: bool) -> StagedFile:
        """The staged file behind inode, ready for writing: copied up, out of the ingest queue."""
        ino, sf = await self._settled(inode)
        if ino & FILE_BIT:
            return await self._copy_up(ino, truncate)
        if sf is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if sf.error:
            raise pyfuse3.FUSEError(errno.EIO)
        if sf.state in ("queued", "failed"):
            sf.state = "staged"  # the queue skips it; the last close queues it again
        if truncate and sf.size:
            await self._truncate(sf, 0)
        return sf

    async def _truncate(self, sf: StagedFile, size: int) -> None:
        try:
            await trio.to_thread.run_sync(os.ftruncate, self._fd(sf), size, limiter=self.io_limiter)
        except OSError as e:
            raise self._poison(sf, e.errno or errno.EIO, "truncate") from None
        sf.size, sf.mtime_ns = size, time.time_ns()
        sf.writes += 1

    async def _copy_up(self, ino: int, truncate: bool) -> StagedFile:
        """Turn stored file ino into a staged copy (its bytes, unless truncating) to write to."""
        fid = ino & ~FILE_BIT
        path = self.ns.ino_path(ino)
        sid = await self._commit(mutate.new_staging_id(self.store))
        spath = staging.staging_path(self.store, sid)
        layout = None if truncate else (await self._thread(self.ns.open, ino)).layout

        def copy() -> tuple[int, int]:
            fd = os.open(spath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if layout is not None:
                    for block in Reader(self.store, self.source).iter_file(layout):
                        os.write(fd, block)
                os.fsync(fd)
                _fsync_dir(spath.parent)
                return fd, layout.size if layout is not None else 0
            except BaseException:
                os.close(fd)
                spath.unlink(missing_ok=True)
                raise

        fd, size = await self._io(copy)
        try:
            await self._commit(mutate.copy_up(self.store, path, fid, sid, size))
        except pyfuse3.FUSEError:
            os.close(fd)
            spath.unlink(missing_ok=True)
            raise
        sf = self.staged[sid] = StagedFile(sid, spath, size, time.time_ns(), acked=True, fd=fd)
        self.ns.moved(ino, STAGED_BIT | sid, path)
        log.info("%s: copied up for writing (%d bytes)", path, size)
        return sf

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = bool(flags & WRITE_FLAGS)
        ino = self.ns.resolve(inode)
        if ino & FILE_BIT and not writable:
            return await super().open(inode, flags, ctx)
        if writable:
            sf = await self._writable(inode, bool(flags & os.O_TRUNC))
        else:
            sf = self._staged_of(ino)
            if sf is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
        await self._io(self._fd, sf)
        fh = self._open_handle(sf, writable)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)

    # ---- reading and writing staged files ----

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._shandles.get(fh)
        if h is None:
            return await super().read(fh, off, size)
        return await self._io(os.pread, h.sf.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._shandles.get(fh)
        if h is None or not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        sf = h.sf
        self._check(sf)
        while (self._staged_bytes() + len(buf) > self.staging_limit
               and any(s.state in ("queued", "ingesting") for s in self.staged.values())):
            self.wstats.backpressure_waits += 1
            await self._space.wait()
        try:
            n = await trio.to_thread.run_sync(os.pwrite, sf.fd, buf, off, limiter=self.io_limiter)
        except OSError as e:
            raise self._poison(sf, e.errno or errno.EIO, "write") from None
        faults.point("write")
        sf.size = max(sf.size, off + n)
        sf.mtime_ns = time.time_ns()
        sf.writes += 1
        self.wstats.bytes_written += n
        return n

    async def _ack(self, sf: StagedFile) -> None:
        """Make what was written durable and acknowledged: fsync, then the journal row."""
        self._check(sf)
        if not sf.dirty or sf.sid not in self.staged:
            return
        writes, size, mtime, first = sf.writes, sf.size, sf.mtime_ns, not sf.acked
        try:
            await trio.to_thread.run_sync(os.fsync, self._fd(sf), limiter=self.io_limiter)
            if first:  # the staging file's directory entry must be durable too
                await trio.to_thread.run_sync(_fsync_dir, sf.path.parent, limiter=self.io_limiter)
        except OSError as e:
            raise self._poison(sf, e.errno or errno.EIO, "fsync") from None
        faults.point("fsync")
        try:
            await trio.to_thread.run_sync(self.store.writer.call,
                                          lambda txn: staging.ack(txn, self.store, sf.sid, size, mtime),
                                          limiter=self.io_limiter)
        except ZipfsError as e:
            if sf.sid not in self.staged:  # removed meanwhile: nothing left to acknowledge
                return
            raise self._poison(sf, _errno_of(e), f"journal commit ({e})") from None
        faults.point("journal")
        sf.acked = True
        sf.acked_writes = writes

    async def flush(self, fh: int) -> None:
        h = self._shandles.get(fh)
        if h is not None and h.writable:
            await self._ack(h.sf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    async def release(self, fh: int) -> None:
        h = self._shandles.pop(fh, None)
        if h is None:
            await super().release(fh)
            return
        sf = h.sf
        sf.opens -= 1
        sf.writers -= h.writable
        if h.writable and sf.writers == 0 and sf.sid in self.staged:
            if sf.error and not sf.acked:
                await self._drop_failed(sf)
            elif not sf.error and not sf.dirty:
                self._enqueue(sf)
        self._close_if_unused(sf)
        faults.point("release")

    async def _drop_failed(self, sf: StagedFile) -> None:
        """A file that never had a successful close and now failed: remove it, free its space."""
        path = self.ns.ino_path(STAGED_BIT | sf.sid)
        await self._io(remove, self.store, [path])
        self.removed(Entry(STAGED_BIT | sf.sid, STAGED, 0, 0, path))
        log.warning("%s: removed after a failed write (%s); nothing of it was acknowledged",
                    path, os.strerror(sf.error))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            sf = await self._writable(inode, truncate=attr.st_size == 0)
            if sf.size != attr.st_size:
                await self._truncate(sf, attr.st_size)
            if sf.writers == 0:  # truncate(2) by path: no close will follow to acknowledge it
                await self._ack(sf)
                self._enqueue(sf)
        if fields.update_mtime:
            await self._set_mtime(inode, attr.st_mtime_ns)
        return await self.getattr(inode, ctx)

    async def _set_mtime(self, inode: int, mtime_ns: int) -> None:
        ino, sf = await self._settled(inode)
        if ino & FILE_BIT:
            await self._commit(mutate.set_mtime(self.store, ino & ~FILE_BIT, mtime_ns))
        elif sf is not None:  # the ingest reads it from the staging file
            await self._io(lambda: os.utime(sf.path, ns=(mtime_ns, mtime_ns)))
            sf.mtime_ns = mtime_ns

    # ---- background ingest ----

    def _enqueue(self, sf: StagedFile) -> None:
        sf.state = "queued"
        self._queue.append(sf.sid)
        self._queue_wake.set()
        self._queue_wake = trio.Event()

    async def ingest_worker(self) -> None:
        """Ingest closed staged files one at a time, oldest first, for the mount's lifetime."""
        while True:
            if not self._queue:
                await self._queue_wake.wait()
                continue
            sid = self._queue.popleft()
            sf = self.staged.get(sid)
            if sf is None or sf.state != "queued":
                continue
            try:
                await self._io(self._fd, sf)
            except pyfuse3.FUSEError:
                sf.state, sf.failure = "failed", "its staging file cannot be opened"
                continue
            sf.state, sf.ingest_ended = "ingesting", trio.Event()
            try:
                await self._ingest(sf)
            finally:
                sf.ingest_ended.set()
                self._close_if_unused(sf)
                self._space_changed()

    async def _ingest(self, sf: StagedFile) -> None:
        try:
            res = await trio.to_thread.run_sync(ingest_staged, self.ingester, sf.sid, self._bases,
                                                limiter=self.ingest_limiter)
        except Exception as e:  # noqa: BLE001 - any failure leaves the file staged and readable
            if sf.sid in self.staged:
                sf.state, sf.failure = "failed", str(e)
                self.wstats.ingest_failures += 1
                log.error("ingest of staged file #%d failed (it stays staged): %s", sf.sid, e)
            return
        del self.staged[sf.sid]
        sf.state = "stored"
        self.wstats.ingested_files += 1
        self.wstats.ingested_bytes += res.report.size
        self.ns.moved(STAGED_BIT | sf.sid, FILE_BIT | res.report.file_id, res.path)
        log.info("%s: ingested, %d bytes stored in %d (base %s)", res.path, res.report.size,
                 res.report.new_bytes, res.base or "none")

