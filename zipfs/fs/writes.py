"""The mount's write path: versions in staging files, the journal, background ingest.

Versions, not overwrites. What a file shows after a crash is exactly its last acknowledged
version: writes go to a staging file (`staging/<sid>`, a version with a journal row), and the
inode is switched to a version only when that version is acknowledged (flush, fsync, close,
or a truncate by path), in the same transaction that lets go of the previous content. Bytes an
acknowledgement covered are never changed in place: a write or truncate that would change
them starts a new version, a copy of what the file shows (copy-on-write); appends past them go
in place (recovery cuts a version back to its acknowledged size). A stored file's first write
copies its bytes into a new version; opening with O_TRUNC starts an empty one.

Every handle of an inode shares one LiveFile, so a write through one descriptor is seen by
every other as soon as it returns; the kernel keeps its page cache coherent, since every change
of a file's bytes comes through it (no reverse invalidation: a mount killed while one waits on
a lock a request holds could never exit). The one change that does not, a dropped version,
makes the file's next open drop the kernel's cached pages.

flush and fsync report errors (the kernel ignores release's); a failed write or fsync poisons
the version: every later write, flush and fsync of it reports that error (ENOSPC stays ENOSPC),
and a poisoned version never acknowledged is dropped at its last close. After the last writer
closes, an acknowledged version is queued (FIFO) for background ingest in its own thread and
limiter, so reads stay fast; until its ingest commits, reads come from staging. Writes wait
(backpressure) while staging is over its budget and the ingest queue can make room.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import lmdb
import pyfuse3
import trio

from zipfs import faults
from zipfs.errors import NamespaceError, ZipfsError
from zipfs.fs.guard import errno_of, guarded
from zipfs.fs.namespace import Namespace
from zipfs.fs.operations import LiveFile, Operations
from zipfs.fs.versions import Version
from zipfs.ingest.base import BaseChoice
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.staged import ingest_staged
from zipfs.read.chunks import ChunkSource
from zipfs.read.reader import FileLayout, Reader
from zipfs.store import inodes, journal
from zipfs.store.inodes import Inode
from zipfs.store.journal import StagedRecord, staging_path
from zipfs.store.pins import Pins
from zipfs.store.records import u64key

log = logging.getLogger("zipfs.mount")
T = TypeVar("T")

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
#: xattrs cp -a and rsync -A try that a store without ACLs must refuse with ENOTSUP (they go on)
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


@dataclass
class WriteStats:
    bytes_written: int = 0
    ingested_files: int = 0
    ingested_bytes: int = 0
    ingest_failures: int = 0
    backpressure_waits: int = 0
    versions_copied: int = 0


def _fsync_dir(path: os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@guarded
class WritableOperations(Operations):
    """The read path plus create/write/rename/..., versions and background ingest."""

    keep_cache = True
    sees_other_writers = False  # only this mount changes what a file holds: its LiveFile is the truth

    def __init__(self, ns: Namespace, source: ChunkSource, workers: int, pins: Pins, ingester: Ingester,
                 staging_limit: int, recovered: dict[int, StagedRecord]) -> None:
        super().__init__(ns, source, workers, pins)
        self.store = ns.store
        self.ingester = ingester
        self.staging_limit = staging_limit
        self.wstats = WriteStats()
        #: versions this mount still has to do something with (write, acknowledge, ingest)
        self.versions: dict[int, Version] = {}
        #: what a LiveFile showed before its working version, to go back to if that is dropped
        self._before: dict[int, Version | FileLayout | None] = {}
        self._locks: dict[int, trio.Lock] = {}
        #: files whose bytes changed behind the kernel's back (a dropped version): their next open
        #: drops the kernel's cached pages (at open, in the opener's context; no reverse call)
        self._stale: set[int] = set()
        self._queue: deque[int] = deque()
        self._queue_wake = trio.Event()
        self._space = trio.Event()
        self.ingest_limiter = trio.CapacityLimiter(1)
        self._bases: dict[int, BaseChoice] = {}
        #: inodes whose new version background ingest stored (the remote's sync pushes their models)
        self.stored_inos: set[int] = set()
        #: every inode that may have xattrs: only this mount sets them, so one that is not here has
        #: none (a superset: removing an xattr or an inode leaves it in)
        self.xattr_inodes = ns.inodes_with_xattrs()
        for sid, rec in sorted(recovered.items()):  # FIFO: oldest first
            v = self.versions[sid] = Version(sid, rec.ino, staging_path(self.store, sid), rec.size,
                                             acked_size=rec.size)
            self._enqueue(v)

    # ---- helpers ----

    async def _commit(self, op: Callable[[lmdb.Transaction], T]) -> T:
        return await trio.to_thread.run_sync(self.store.writer.call, op, limiter=self.io_limiter)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)

    def _space_changed(self) -> None:
        self._space.set()
        self._space = trio.Event()

    def _staged_bytes(self) -> int:
        return sum(v.disk for v in self.versions.values())

    def _poison(self, v: Version, err: int, what: str) -> pyfuse3.FUSEError:
        v.error = v.error or err
        log.error("%s (staged version #%d): %s failed: %s; the file is poisoned", self.live_path(v.ino),
                  v.sid, what, os.strerror(err))
        return pyfuse3.FUSEError(err)

    def live_path(self, ino: int) -> str:
        lf = self.live.get(ino)
        return lf.path if lf is not None else f"inode {ino}"

    def _lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    async def _finish(self, rel: inodes.Released) -> None:
        """After a namespace commit: delete tombstoned staging files, forget removed inodes."""
        for sid in rel.dead:
            v = self.versions.pop(sid, None)
            if v is not None:
                v.state = "gone"  # handles holding it keep reading it
        for ino in rel.removed:
            lf = self.live.get(ino)
            if lf is not None and lf.node is not None:
                lf.node.nlink = 0
        if rel.dead:
            await self._io(journal.purge, self.store, rel.dead)
            self._space_changed()

    # ---- statistics and state ----

    def stats_json(self) -> dict[str, Any]:
        out = super().stats_json()
        states = [v.state for v in self.versions.values()]
        out.update({
            "staged_files": len(self.versions), "staged_bytes": self._staged_bytes(),
            "staging_limit": self.staging_limit, "queued": states.count("queued"),
            "ingesting": states.count("ingesting"), "failed": states.count("failed"),
            "open_for_write": sum(1 for lf in self.live.values() if lf.writers),
            "ingested_files": self.wstats.ingested_files, "ingested_bytes": self.wstats.ingested_bytes,
            "ingest_failures": self.wstats.ingest_failures, "bytes_written": self.wstats.bytes_written,
            "backpressure_waits": self.wstats.backpressure_waits,
            "versions_copied": self.wstats.versions_copied,
        })
        return out

    def _shown(self, node: Inode) -> Version | None:
        """The staged version a regular file shows in this mount now, if any."""
        lf = self.live.get(node.ino)
        if lf is not None:
            return lf.version
        return self.versions.get(node.content_id) if node.content == inodes.STAGED else None

    def _overlay(self, node: Inode) -> Inode:
        if not node.is_reg:
            return node
        lf = self.live.get(node.ino)
        v = self._shown(node)
        if v is None:
            return node
        out = replace(node, size=v.size)
        if lf is not None and lf.times is not None:
            out.mtime_ns, out.ctime_ns = lf.times
        return out

    def file_state(self, node: Inode) -> str:
        v = self._shown(node)
        if v is None:
            return super().file_state(node)
        if v.error:
            return f"staged (write failed: {os.strerror(v.error)})"
        if v.state == "failed":
            return f"staged (ingest failed: {v.failure})"
        return "ingesting" if v.state == "ingesting" else "stored" if v.state == "stored" else "staged"

    # ---- LiveFiles of a writable mount ----

    async def _staged_version(self, node: Inode) -> Version:
        v = self.versions.get(node.content_id)
        if v is None:
            raise ZipfsError(f"inode {node.ino}: its staged version #{node.content_id} is not known "
                             "to this mount")
        return await self._hold_open(v)

    def _let_before_go(self, ino: int) -> None:
        """The file no longer needs what it showed before its working version (kept to go back to)."""
        before = self._before.pop(ino, None)
        if isinstance(before, Version):
            before.let_go()

    def _forget_live(self, lf: LiveFile) -> None:
        if lf.opens == 0 and not lf.done:
            self._let_before_go(lf.ino)
            self._locks.pop(lf.ino, None)
        super()._forget_live(lf)

    # ---- namespace changes ----

    async def _new_node(self, op: Callable[[lmdb.Transaction], Inode]) -> pyfuse3.EntryAttributes:
        return self._attr(await self._commit(op))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_node(lambda txn: inodes.create(
            self.store, txn, parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx.uid, ctx.gid,
            time.time_ns()))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """FIFOs, sockets and device nodes are metadata only; a regular file is an empty one."""
        return await self._new_node(lambda txn: inodes.create(
            self.store, txn, parent_inode, name, mode, ctx.uid, ctx.gid, time.time_ns(), rdev=rdev))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_node(lambda txn: inodes.create(
            self.store, txn, parent_inode, name, stat.S_IFLNK | 0o777, ctx.uid, ctx.gid, time.time_ns(),
            target=target))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._new_node(lambda txn: inodes.link(self.store, txn, inode, new_parent_inode,
                                                            new_name, time.time_ns()))

    async def _remove(self, op: Callable[[lmdb.Transaction, inodes.Released], object]) -> None:
        rel = inodes.Released()

        def run(txn: lmdb.Transaction) -> None:
            rel.dead.clear()
            rel.removed.clear()
            op(txn, rel)

        await self._commit(run)
        await self._finish(rel)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(lambda txn, rel: inodes.unlink(self.store, txn, parent_inode, name,
                                                          time.time_ns(), rel))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(lambda txn, rel: inodes.rmdir(self.store, txn, parent_inode, name,
                                                         time.time_ns(), rel))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(lambda txn, rel: inodes.rename(
            self.store, txn, parent_inode_old, name_old, parent_inode_new, name_new, flags, time.time_ns(),
            rel))

    # ---- attributes ----

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        now = time.time_ns()
        if fields.update_size:
            lf = await self._live(inode)
            lf.opens += 1  # held for the duration, so it is not forgotten under us
            h = self._handles.get(fh) if fh is not None else None
            by_path = h is None or not h.writable  # truncate(2) by path: no close will follow
            try:
                await self._truncate(lf, attr.st_size)
                if by_path:
                    await self._ack(lf)
                    self._idle(lf)
            except pyfuse3.FUSEError:
                if by_path and lf.writers == 0:
                    await self._last_writer_closed(lf)  # drop or roll back what failed, as a close would
                raise
            finally:
                lf.opens -= 1
                self._forget_live(lf)
        if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime \
                or fields.update_mtime or fields.update_ctime:
            lf = self.live.get(inode)
            if fields.update_mtime and lf is not None and lf.times is not None:
                lf.times = (attr.st_mtime_ns, now)

            def op(txn: lmdb.Transaction) -> Inode:
                node = inodes.find(self.store, txn, inode)
                if node is None:
                    if lf is None or lf.node is None:
                        raise NamespaceError(errno.ENOENT, f"inode {inode} is gone")
                    node = lf.node  # an open file whose last name is gone: it changes in memory
                if fields.update_mode:
                    node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
                if fields.update_uid:
                    node.uid = attr.st_uid
                if fields.update_gid:
                    node.gid = attr.st_gid
                if fields.update_atime:
                    node.atime_ns = attr.st_atime_ns
                if fields.update_mtime:
                    node.mtime_ns = attr.st_mtime_ns
                node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
                if node.nlink:
                    inodes.put(self.store, txn, node)
                return node

            node = await self._commit(op)
            if lf is not None:
                lf.node = node
        return await self.getattr(inode, ctx)

    # ---- xattrs ----

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name in ACL_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if name.startswith(b"user.zipfs."):
            raise pyfuse3.FUSEError(errno.EPERM)  # computed by the mount, not settable

        def op(txn: lmdb.Transaction) -> None:
            node = inodes.get(self.store, txn, inode)
            self.store.put(txn, "xattrs", u64key(inode) + name, value)
            node.ctime_ns = time.time_ns()
            inodes.put(self.store, txn, node)

        self.xattr_inodes.add(inode)  # before the commit: a getxattr meanwhile asks the store
        await self._commit(op)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        def op(txn: lmdb.Transaction) -> bool:
            if not self.store.delete(txn, "xattrs", u64key(inode) + name):
                return False
            node = inodes.get(self.store, txn, inode)
            node.ctime_ns = time.time_ns()
            inodes.put(self.store, txn, node)
            return True

        if name.startswith(b"user.zipfs."):
            raise pyfuse3.FUSEError(errno.EPERM)
        if not await self._commit(op):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    # ---- creating and opening ----

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        def op(txn: lmdb.Transaction) -> tuple[Inode, int]:
            node = inodes.create(self.store, txn, parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode),
                                 ctx.uid, ctx.gid, time.time_ns())
            return node, journal.new(self.store, txn, node.ino, created=True)

        node, sid = await self._commit(op)
        path = staging_path(self.store, sid)
        try:
            fd = await self._io(os.open, path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            await self._remove(lambda txn, rel: inodes.unlink(self.store, txn, parent_inode, name,
                                                              time.time_ns(), rel))
            raise
        v = self.versions[sid] = Version(sid, node.ino, path, 0, written=0, fd=fd)
        v.hold()
        self.pins.pin(node.ino)
        lf = self.live[node.ino] = LiveFile(node.ino, await self._thread(self.ns.describe, node.ino), None,
                                            version=v, node=node)
        self._before[node.ino] = None
        fh = self._open_handle(lf, writable=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache, direct_io=False), self._attr(node)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = bool(flags & WRITE_FLAGS)
        lf = await self._live(inode)
        fh = self._open_handle(lf, writable)
        if writable and lf.version is not None and lf.version.error and not lf.version.acked:
            await self.release(fh)
            raise pyfuse3.FUSEError(errno.EIO)  # a poisoned new file: it goes at its last close
        if flags & os.O_TRUNC and writable:
            try:
                await self._truncate(lf, 0)
            except BaseException:
                await self.release(fh)
                raise
        keep = lf.ino not in self._stale
        self._stale.discard(lf.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    def _open_handle(self, lf: LiveFile, writable: bool) -> int:
        lf.writers += writable
        return super()._open_handle(lf, writable)

    # ---- versions ----

    async def _writable(self, lf: LiveFile, lo: int, keep: int | None = None) -> Version:
        """The version a write at offset lo (or a truncate to lo, keep = lo) goes to: the working
        version, or a new one copied from what the file shows when acknowledged bytes would
        change."""
        async with self._lock(lf.ino):
            v = lf.version
            if v is not None and v.error:
                raise pyfuse3.FUSEError(v.error)
            if v is not None and v.state == "gone":
                return v  # its last name is gone: nothing to keep safe, write in place
            if v is not None and v.state in ("queued", "failed"):
                v.state = "working"  # the queue skips it; the last close queues it again
            if v is not None and v.state == "working" and not (v.acked and lo < v.acked_size):
                return v
            return await self._copy_on_write(lf, keep)

    async def _copy_on_write(self, lf: LiveFile, keep: int | None) -> Version:
        """A new working version holding the file's bytes as shown now (up to keep)."""
        old, layout = lf.version, lf.layout
        size = old.size if old is not None else layout.size if layout is not None else 0
        size = size if keep is None else min(size, keep)
        sid = await self._commit(lambda txn: journal.new(self.store, txn, lf.ino))
        path = staging_path(self.store, sid)
        reader = Reader(self.store, self.source)

        def copy() -> int:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                done = 0
                while done < size and old is not None:
                    n = os.copy_file_range(old.open(), fd, size - done, done, done)
                    if n == 0:
                        raise ZipfsError(f"staged version #{old.sid} is shorter than {size} bytes")
                    done += n
                for off in range(0, size if old is None else 0, 8 << 20):
                    os.pwrite(fd, reader.read(layout, off, min(8 << 20, size - off)), off)
                return fd
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise

        try:
            if old is not None:
                with old.use():
                    fd = await self._io(copy)
            else:
                fd = await self._io(copy)
        except (ZipfsError, OSError):
            await self._drop_rows([sid])
            raise
        v = self.versions[sid] = Version(sid, lf.ino, path, size, written=size, fd=fd)
        v.hold()
        if lf.ino in self._before:  # the previous working version was never acknowledged
            if old is not None:
                old.let_go()
        else:  # what the file showed, kept (held) to go back to if this version is dropped
            self._before[lf.ino] = old if old is not None else layout
        lf.version, lf.layout = v, None
        self.wstats.versions_copied += 1
        return v

    async def _drop_rows(self, sids: list[int]) -> None:
        """Tombstone and purge versions this mount gives up (never acknowledged)."""
        rel = inodes.Released()

        def op(txn: lmdb.Transaction) -> None:
            for sid in sids:
                journal.tombstone(self.store, txn, sid, rel.dead)

        await self._commit(op)
        await self._finish(rel)

    async def _truncate(self, lf: LiveFile, size: int) -> None:
        """Set the file's size (truncate, O_TRUNC); its times change even when the size does not."""
        v = await self._writable(lf, size, keep=size)
        if v.size != size:
            try:
                with v.use():
                    await self._io(lambda: os.ftruncate(v.open(), size))
            except OSError as e:
                raise self._poison(v, e.errno or errno.EIO, "truncate") from None
            v.size = size
        v.writes += 1
        now = time.time_ns()
        lf.times = (now, now)

    # ---- reading and writing ----

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles.get(fh)
        if h is None or not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        lf = h.live
        while (self._staged_bytes() + len(buf) > self.staging_limit
               and any(v.state in ("queued", "ingesting") for v in self.versions.values())):
            self.wstats.backpressure_waits += 1
            await self._space.wait()
        v = await self._writable(lf, off)
        try:
            with v.use():
                n = await self._io(lambda: os.pwrite(v.open(), buf, off))
        except OSError as e:
            raise self._poison(v, e.errno or errno.EIO, "write") from None
        faults.point("write")
        v.size = max(v.size, off + n)
        if v.written >= 0:  # (a version recovered at start counts its whole size)
            v.written += n
        v.writes += 1
        now = time.time_ns()
        lf.times = (now, now)
        self.wstats.bytes_written += n
        return n

    async def _ack(self, lf: LiveFile) -> None:
        """Make the working version durable and acknowledged: fsync, then one journal commit
        that points the inode at it and lets go of what it showed before."""
        v = lf.version
        if v is None or v.state == "gone":
            return
        if v.error:
            raise pyfuse3.FUSEError(v.error)
        if not v.dirty:
            return
        writes, size, times, first = v.writes, v.size, lf.times, not v.acked
        try:
            with v.use():
                await self._io(lambda: os.fsync(v.open()))
                if first:  # the staging file's directory entry must be durable too
                    await self._io(_fsync_dir, v.path.parent)
        except OSError as e:
            raise self._poison(v, e.errno or errno.EIO, "fsync") from None
        faults.point("fsync")
        rel = inodes.Released()

        def op(txn: lmdb.Transaction) -> bool:
            rel.dead.clear()
            row = journal.get(self.store, txn, v.sid)
            node = inodes.find(self.store, txn, v.ino)
            if row is None or row.state != journal.LIVE or node is None:
                return False  # removed meanwhile (zipfs rm): nothing left to acknowledge
            row.size, row.acked = size, True
            journal.put(self.store, txn, v.sid, row)
            if times is not None:
                node.mtime_ns, node.ctime_ns = times
            inodes.set_content(self.store, txn, node, inodes.STAGED, v.sid, size, rel)
            return True

        try:
            still_there = await self._commit(op)
        except ZipfsError as e:
            raise self._poison(v, errno_of(e), f"journal commit ({e})") from None
        faults.point("journal")
        if not still_there:
            v.state = "gone"
            self.versions.pop(v.sid, None)
            if lf.node is not None:
                lf.node.nlink = 0
            await self._drop_rows([v.sid])
            return
        v.acked_size, v.acked_writes = size, writes
        if lf.times == times:
            lf.times = None  # the record has them now
        self._let_before_go(lf.ino)
        await self._finish(rel)

    async def flush(self, fh: int) -> None:
        h = self._handles.get(fh)
        if h is not None and h.writable:
            await self._ack(h.live)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """fsync of any descriptor makes the file durable, as on Linux filesystems (a read-only
        one included); flush, at close, acknowledges only what that descriptor wrote."""
        h = self._handles.get(fh)
        if h is not None:
            await self._ack(h.live)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Namespace changes are durable when they return (one LMDB commit each)."""

    async def release(self, fh: int) -> None:
        h = self._handles.get(fh)
        if h is not None and h.writable:
            lf = h.live
            lf.writers -= 1
            if lf.writers == 0:
                await self._last_writer_closed(lf)
        await super().release(fh)
        faults.point("release")

    async def _last_writer_closed(self, lf: LiveFile) -> None:
        v = lf.version
        if v is None or v.state != "working":
            return
        if v.dirty and not v.error:  # written through mmap after the last flush, say
            try:
                await self._ack(lf)
            except pyfuse3.FUSEError:
                pass  # poisoned: reported by the flush or fsync that hit it
        if v.error and not v.acked:
            await self._discard(lf, v)
            return
        if v.error:
            await self._roll_back(lf, v)
        self._idle(lf)

    async def _roll_back(self, lf: LiveFile, v: Version) -> None:
        """A version that failed after an acknowledgement goes back to what was acknowledged: only
        bytes past it were written in place (copy on write keeps the rest), so cutting it there
        is exact. The file is writable again; the kernel's cached pages are dropped at its next
        open."""
        try:
            with v.use():
                await self._io(lambda: os.ftruncate(v.open(), v.acked_size))
        except OSError as e:
            log.error("%s: cannot cut version #%d back to its acknowledged size: %s", lf.path, v.sid, e)
            return
        log.warning("%s: a write failed (%s); back to the %d bytes last acknowledged", lf.path,
                    os.strerror(v.error), v.acked_size)
        v.size, v.error, v.writes, lf.times = v.acked_size, 0, v.acked_writes, None
        self._stale.add(lf.ino)

    def _idle(self, lf: LiveFile) -> None:
        """Queue the working version for ingest when nothing writes it and it is acknowledged."""
        v = lf.version
        if v is not None and v.state == "working" and lf.writers == 0 and not v.dirty:
            self._enqueue(v)

    async def _discard(self, lf: LiveFile, v: Version) -> None:
        """A version never acknowledged that failed: drop it; the file shows what it did before
        (a new file that never had a successful close loses its name)."""
        before = self._before.pop(lf.ino, None)
        log.warning("%s: a write failed (%s) before anything of it was acknowledged; dropped",
                    lf.path, os.strerror(v.error))
        self.versions.pop(v.sid, None)
        v.state = "gone"
        self._stale.add(lf.ino)
        if isinstance(before, Version):
            lf.version = before  # still held since the copy was made
            if before.acked and lf.writers == 0:
                self._enqueue(before)
        else:
            lf.version, lf.layout = None, before
            if before is None and lf.node is not None and lf.node.content == inodes.NONE:
                await self._remove(lambda txn, rel: self._unname(txn, lf.node, rel))
                lf.layout = FileLayout.empty()
        await self._drop_rows([v.sid])
        v.let_go()

    def _unname(self, txn: lmdb.Transaction, node: Inode, rel: inodes.Released) -> None:
        """Remove the name a new file was created under, if it still has it."""
        if inodes.lookup(self.store, txn, node.parent, node.name) == node.ino:
            inodes.unlink(self.store, txn, node.parent, node.name, time.time_ns(), rel)

    # ---- background ingest ----

    def _still_shown(self, v: Version) -> bool:
        """Whether the store still has inode v.ino showing version v (blocking)."""
        with self.store.read() as txn:
            row = journal.get(self.store, txn, v.sid)
            return inodes.shows_staged(self.store, txn, v.ino, v.sid) and row is not None \
                and row.state == journal.LIVE

    def _enqueue(self, v: Version) -> None:
        v.state = "queued"
        self._queue.append(v.sid)
        self._queue_wake.set()
        self._queue_wake = trio.Event()

    @property
    def ingest_idle(self) -> bool:
        """Nothing staged waits for or is in background ingest."""
        return not any(v.state in ("queued", "ingesting") for v in self.versions.values())

    async def ingest_worker(self) -> None:
        """Ingest closed, acknowledged versions one at a time, oldest first."""
        while True:
            if not self._queue:
                await self._queue_wake.wait()
                continue
            v = self.versions.get(self._queue.popleft())
            if v is None or v.state != "queued":
                continue
            v.state, v.ingest_ended = "ingesting", trio.Event()
            try:
                await self._ingest(v)
            finally:
                v.ingest_ended.set()
                self._space_changed()

    async def _ingest(self, v: Version) -> None:
        try:
            with v.use():
                fd = await self._io(v.open)
                res = await trio.to_thread.run_sync(ingest_staged, self.ingester, v.sid, v.ino, fd,
                                                    v.acked_size, self._bases, limiter=self.ingest_limiter)
        except Exception as e:  # noqa: BLE001 - any failure leaves the file staged and readable
            if v.state == "ingesting" and not await self._thread(self._still_shown, v):
                self.versions.pop(v.sid, None)  # removed or superseded meanwhile (zipfs rm, say)
                v.state = "gone"
            elif v.state == "ingesting" and v.sid in self.versions:
                v.state, v.failure = "failed", str(e)
                self.wstats.ingest_failures += 1
                log.error("ingest of %s (staged version #%d) failed (it stays staged): %s",
                          self.live_path(v.ino), v.sid, e)
            return
        self.versions.pop(v.sid, None)
        v.state = "stored"
        self.stored_inos.add(v.ino)
        self.wstats.ingested_files += 1
        self.wstats.ingested_bytes += res.report.size
        log.info("%s: ingested, %d bytes stored in %d (base %s)", res.path, res.report.size,
                 res.report.new_bytes, res.base or "none")

