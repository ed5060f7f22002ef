"""pyfuse3 operations on trio: the read path and metadata; on their own, a read-only mount.
zipfs.fs.writes adds the write path.

One trio thread runs every handler, so nothing here blocks it: metadata reads run in worker
threads, chunk decodes in the decoder's own (zipfs.fs.decoder); a read whose chunks are all
cached returns without awaiting. Concurrent readers of one chunk share one decode job. Prefetch
(sequential read-ahead, and tensor-aware: the first read inside a tensor queues the rest of that
tensor) queues chunk ids for the decoder.

Every handle of an inode shares one LiveFile: what that inode's bytes are now. While any handle
is open the inode is pinned (zipfs.store.pins), so the version it reads survives rm, a rename
over it and gc, in this process and in others (POSIX unlink semantics).
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from zipfs.errors import StoreError, ZipfsError
from zipfs.fs.decoder import ADVISE_AHEAD, Decoder
from zipfs.fs.guard import guarded
from zipfs.fs.namespace import Namespace
from zipfs.fs.versions import Version
from zipfs.read.chunks import ChunkSource
from zipfs.read.reader import FileLayout, check_length
from zipfs.store import inodes, journal
from zipfs.store.inodes import ROOT, Inode
from zipfs.store.pins import Pins
from zipfs.store.records import TensorEntry

log = logging.getLogger("zipfs.mount")
T = TypeVar("T")

#: names can change under us (`zipfs ingest` or `rm` from the CLI while mounted): the kernel
#: revalidates entries and attributes after this long
ENTRY_TIMEOUT = 1.0
#: the most a tensor-aware prefetch queues at once, in bytes
TENSOR_PREFETCH_MAX = 64 << 20
#: sequential read-ahead, in bytes, once a handle reads sequentially
SEQUENTIAL_AHEAD = 8 << 20
#: how many times deeper read-ahead goes for a store whose payloads come from a bucket
REMOTE_DEPTH = 4
#: the stretch right after the furthest read that each sequential read queues again
SEQUENTIAL_REQUEUE = 2 << 20
#: how far behind the furthest read a read may start and still count as sequential
SEQUENTIAL_SLACK = 4 << 20
#: chunks whose served bytes are counted at once (see Operations._served_bytes)
SERVED_TRACKED = 4096
#: extended attributes the mount answers itself
STATE_XATTR, SHA_XATTR, STATS_XATTR = b"user.zipfs.state", b"user.zipfs.sha256", b"user.zipfs.stats"


@dataclass(eq=False)
class LiveFile:
    """A regular file the mount has open: where its bytes come from now, shared by its handles."""

    ino: int
    path: str
    #: stored content (chunks); None while a staged version is what the file shows
    layout: FileLayout | None
    tensors: list[TensorEntry] = field(default_factory=list)
    sha256: str | None = None
    #: a staged version reads (and, writable mounts, writes) use
    version: Version | None = None
    opens: int = 0
    writers: int = 0
    #: the inode's record as last seen (what fstat shows once its last name is gone)
    node: Inode | None = None
    #: (mtime, ctime) of writes not yet acknowledged (the record has the older ones)
    times: tuple[int, int] | None = None
    #: the inode's content when it was loaded: (kind, id)
    content_key: tuple[int, int] = (0, 0)
    #: its handles are all gone and its pin with them
    done: bool = False
    #: where each tensor starts, for bisect (prefetch of the rest of a tensor being read)
    tensor_starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.tensor_starts = [t.start for t in self.tensors]


@dataclass
class Handle:
    """One open file and what prefetch knows of how it is read."""

    live: LiveFile
    writable: bool = False
    #: the furthest offset a read of this handle reached (sequential detection)
    next_off: int = -1
    #: how far sequential prefetch has queued this handle's chunks, in which layout
    queued_to: int = -1
    queued_layout: FileLayout | None = None
    seen_tensors: set[int] = field(default_factory=set)


@dataclass
class MountStats:
    reads: int = 0
    bytes_read: int = 0
    eio: int = 0


@guarded
class Operations(pyfuse3.Operations):
    """Read-only FUSE operations over a Namespace and a ChunkSource."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    #: the writable mount keeps page caches (every change of a file's bytes comes through the
    #: kernel); a read-only one sees another mount's writes, so it drops them at each open
    keep_cache = False
    #: another mount writes the store: a file open here can change under its handles
    sees_other_writers = True
    #: inodes that may have xattrs, where only this mount sets them; None: ask the store each time
    xattr_inodes: set[int] | None = None

    def __init__(self, ns: Namespace, source: ChunkSource, workers: int, pins: Pins) -> None:
        super().__init__()
        self.ns = ns
        self.source = source
        self.cache = source.cache
        self.pins = pins
        self.workers = workers
        self.limiter = trio.CapacityLimiter(workers)
        #: twice the workers decode and prefetch, so one waiting for its payload to come off the
        #: disk leaves a core to another, and as many again only for demand reads; the prefetch
        #: queue holds what half the cache holds
        remote = ns.store.remote is not None
        #: bytes read ahead of a sequential reader; a bucket answers each fetch after a round
        #: trip, so a store with a remote reads further ahead and asks for more at once
        self.sequential_ahead = SEQUENTIAL_AHEAD * (REMOTE_DEPTH if remote else 1)
        self.decoder = Decoder(source, 2 * workers, max(4, source.cache.capacity // (2 << 20)), workers,
                               advise_ahead=ADVISE_AHEAD * (REMOTE_DEPTH if remote else 1))
        #: staging files are read and written in their own threads: they wait on disks
        self.io_limiter = trio.CapacityLimiter(8)
        self.stats = MountStats()
        self.live: dict[int, LiveFile] = {}
        self._switching: dict[int, trio.Lock] = {}
        self._served: dict[int, int] = {}
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self._next_fh = 1

    # ---- helpers ----

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call in a worker thread (the guard maps its errors to errnos)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _overlay(self, node: Inode) -> Inode:
        """A regular file's attributes as this mount sees them now (unacknowledged writes
        included); the writable mount overrides."""
        return node

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        node = self._overlay(node)
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = ENTRY_TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid, a.st_gid = node.uid, node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = 1 << 20
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.atime_ns, node.mtime_ns, node.ctime_ns
        return a

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _node(self, ino: int) -> Inode:
        """The inode's record; an open file whose last name is gone still has its last one.

        An inode that is gone is ESTALE, not ENOENT: the kernel may still map a name to it for a
        moment (another process replaced or removed the name), and on ESTALE it looks the name up
        again instead of failing the call.
        """
        try:
            node = await self._thread(self.ns.find, ino)
        except StoreError as e:
            if ino != ROOT:
                raise
            log.error("the root directory's record: %s; showing a stand-in", e)
            node = self.ns.stand_in_root()
        if node is not None:
            return node
        lf = self.live.get(ino)
        if lf is not None and lf.node is not None:
            lf.node.nlink = 0
            return lf.node
        raise pyfuse3.FUSEError(errno.ESTALE)

    # ---- metadata ----

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return await self.getattr(parent_inode, ctx)
        if name == b"..":
            node = await self._node(parent_inode)
            return await self.getattr(node.parent if parent_inode != ROOT else ROOT, ctx)
        node = await self._thread(self.ns.lookup, parent_inode, name)
        if node is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = ENTRY_TIMEOUT
            return neg
        return self._attr(await self._notice(node))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(await self._notice(await self._node(inode)))

    async def _notice(self, node: Inode) -> Inode:
        """The record to tell the kernel of. If the writing mount rewrote a file in place while
        it is open here, switch to the new version first (see _move_handles) and tell the one
        the handles now read: the size the kernel learns is that of the bytes they return."""
        lf = self.live.get(node.ino) if self.sees_other_writers and node.is_reg else None
        if lf is None or not lf.opens or lf.content_key == (node.content, node.content_id):
            return node
        lf = await self._live(node.ino)
        return lf.node if lf.node is not None else node

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._node(inode)
        if not node.is_link:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        listed = await self._thread(self.ns.listdir, inode)
        entries = [(name, await self._notice(node)) for name, node in listed]
        fh = self._new_fh()
        self._dirs[fh] = [(name, self._attr(node)) for name, node in entries]
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
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

    # ---- xattrs: mount statistics on the root, state and sha256 on files, stored user ones ----

    def stats_json(self) -> dict[str, Any]:
        return {
            "reads": self.stats.reads, "bytes_read": self.stats.bytes_read,
            "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
            "cache_bytes": self.cache.size, "cache_capacity": self.cache.capacity,
            "buffers_mapped": self.source.pool.mapped, "buffers_in_use": self.source.pool.in_use,
            "chunks_decoded": self.source.decoded, "bytes_decoded": self.source.decoded_bytes,
            "decode_seconds": round(self.source.decode_seconds, 3),
            "prefetch_queued": self.decoder.prefetch_queued,
            "prefetch_decoded": self.decoder.prefetch_decoded,
            "eio": self.stats.eio, "open_files": len(self._handles), "inflight": self.decoder.inflight,
            "workers": self.workers,
        }

    def file_state(self, node: Inode) -> str:
        """user.zipfs.state of a regular file: stored, or (writable mounts) staged / ingesting."""
        return "staged" if node.content == inodes.STAGED else "stored"

    async def _virtual_xattrs(self, inode: int) -> dict[bytes, bytes]:
        if inode == ROOT:
            return {STATS_XATTR: json.dumps(self.stats_json()).encode()}
        node = await self._node(inode)
        if not node.is_reg:
            return {}
        state = self.file_state(node)
        out = {STATE_XATTR: state.encode()}
        if state == "stored" and node.content:
            sha = (await self._thread(self.ns.content, node)).sha256
            if sha:
                out[SHA_XATTR] = sha.encode()
        return out

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """The stored extended attributes. The mount's own (user.zipfs.*) are read by name and not
        listed: tools that copy every listed attribute (cp -a, rsync -X) would copy them into files
        where they cannot be set."""
        return list(await self._thread(self.ns.xattrs, inode))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name.startswith(b"user.zipfs."):
            value = (await self._virtual_xattrs(inode)).get(name)
        elif self.xattr_inodes is not None and inode not in self.xattr_inodes:
            value = None  # no thread hop: the kernel asks for security.capability before every write
        else:
            value = await self._thread(self.ns.xattr, inode, name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    # ---- the read path ----

    async def _staged_version(self, node: Inode) -> Version:
        """The staged version a file shows, held and open (a read-only mount reads the writer's
        staging file); ZipfsError when its staging file is gone (ingested meanwhile)."""
        v = Version(node.content_id, node.ino, journal.staging_path(self.ns.store, node.content_id),
                    node.size, acked_size=node.size, state="stored", flags=os.O_RDONLY)
        return await self._hold_open(v)

    async def _hold_open(self, v: Version) -> Version:
        v.hold()
        try:
            await trio.to_thread.run_sync(v.open, limiter=self.io_limiter)
        except OSError as e:
            v.let_go()
            raise StoreError(f"staged version #{v.sid} cannot be opened: {e.strerror}") from None
        return v

    async def _current(self, lf: LiveFile) -> bool:
        """Whether a loaded LiveFile still shows what its inode holds. A read-only mount sees
        another mount's writes: a file rewritten there is loaded anew at the next open."""
        node = await self._thread(self.ns.find, lf.ino)
        return node is not None and (node.content, node.content_id) == lf.content_key

    async def _live(self, ino: int) -> LiveFile:
        """The LiveFile of inode ino, loaded (and pinned) on first use; in a mount that sees
        another mount's writes, the current one, checked and switched to under a lock per inode
        (two requests switching at once would leave handles on a version let go)."""
        lf = self.live.get(ino)
        if not self.sees_other_writers:
            return lf if lf is not None else await self._load_retrying(ino, None)
        lock = self._switching.setdefault(ino, trio.Lock())
        try:
            async with lock:
                while True:
                    lf = self.live.get(ino)
                    if lf is None or not await self._current(lf) or self.live.get(ino) is not lf:
                        lf = await self._load_retrying(ino, lf)
                    if not lf.done:
                        return lf
                    # every handle closed while the kernel's pages were dropped: load it afresh
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._switching.pop(ino, None)

    async def _load_retrying(self, ino: int, lf: LiveFile | None) -> LiveFile:
        for _ in range(4):
            try:
                return await self._load(ino, lf)
            except ZipfsError:  # its staged version was ingested between our reads: look again
                pass
        return await self._load(ino, lf)

    async def _load(self, ino: int, lf: LiveFile | None) -> LiveFile:
        self.pins.pin(ino)  # before the record is read: see zipfs.store.pins
        try:
            node = await self._thread(self.ns.find, ino)
            if node is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            if not node.is_reg:
                raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
            content = await self._thread(self.ns.content, node)
            path = await self._thread(self.ns.describe, ino)
            version = await self._staged_version(node) if content.staged else None
        except BaseException:
            self.pins.unpin(ino)
            raise
        other = self.live.get(ino)
        same = other is not None and (not self.sees_other_writers  # the writable mount's is the truth
                                      or other.content_key == (node.content, node.content_id))
        if other is not None and other is not lf and same:
            self.pins.unpin(ino)  # another request loaded it meanwhile
            if version is not None:
                version.let_go()
            return other
        new = self.live[ino] = LiveFile(ino, path, content.layout, content.tensors, content.sha256, version,
                                        node=node, content_key=(node.content, node.content_id))
        if other is not None:
            await self._move_handles(other, new)
        return new

    async def _move_handles(self, old: LiveFile, new: LiveFile) -> None:
        """The writing mount rewrote the file in place (the same inode): the handles open here
        read the new version from now on, as that mount's own handles see a rewrite. One version
        per inode: the kernel keeps one page cache per inode. Its attributes are dropped first (a
        read that asks for the size again waits for this switch, under the inode's lock), then
        the handles move, then its pages go (reads of the old version in flight keep their
        pages until they are answered). A read racing the switch itself may still get part of
        each version, as one racing an in-place write does on a local filesystem."""
        if old.opens:
            await self._invalidate(new, attr_only=True)
        for h in self._handles.values():
            if h.live is old:
                h.live = new
                old.opens -= 1
                new.opens += 1
        self._forget_live(old)
        if new.opens:  # else the kernel drops its pages at the next open (keep_cache)
            await self._invalidate(new, attr_only=False)

    async def _invalidate(self, lf: LiveFile, attr_only: bool) -> None:
        try:  # in a thread: the kernel waits for pages of reads this thread must still answer
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, lf.ino, attr_only)
        except OSError as e:
            log.warning("%s: cannot drop what the kernel cached of the old version: %s", lf.path, e)

    def _forget_live(self, lf: LiveFile) -> None:
        """The last handle of a file went: unpin it and let its version go."""
        if lf.opens or lf.done:
            return
        lf.done = True
        if self.live.get(lf.ino) is lf:
            del self.live[lf.ino]
        self.pins.unpin(lf.ino)
        if lf.version is not None:
            lf.version.let_go()

    def _open_handle(self, lf: LiveFile, writable: bool) -> int:
        fh = self._new_fh()
        self._handles[fh] = Handle(lf, writable)
        lf.opens += 1
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._open_handle(await self._live(inode), writable=False)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache, direct_io=False)

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        h.live.opens -= 1
        self._forget_live(h.live)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handles[fh]
        v = h.live.version
        if v is not None:
            return await self._staged_read(v, size, off)
        return await self._stored_read(h, off, size)

    async def _staged_read(self, v: Version, size: int, off: int) -> bytes:
        """Bytes of a staged version; EIO when its staging file has fewer than the version holds
        (cut by a damaged disk or a hand: a short read would show a shorter file as success)."""
        with v.use():
            data = await trio.to_thread.run_sync(lambda: os.pread(v.open(), size, off),
                                                 limiter=self.io_limiter)
        if len(data) < min(size, v.size - off):
            self.stats.eio += 1
            log.error("EIO reading staged version #%d at offset %d: its staging file ends at %d of %d bytes",
                      v.sid, off, off + len(data), v.size)
            raise pyfuse3.FUSEError(errno.EIO)
        return data

    async def _stored_read(self, h: Handle, off: int, size: int) -> bytes:
        layout = h.live.layout
        parts = []
        for cid, lo, hi, n in layout.extents(off, size):
            data = self.cache.get(cid)
            try:
                if data is None:
                    data = await self.decoder.get(cid)
                check_length(cid, data, n)
            except ZipfsError as e:
                self.stats.eio += 1
                log.error("EIO reading %s at offset %d (chunk %d): %s", h.live.path, off, cid, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            parts.append(memoryview(data)[lo:hi])
            self._served_bytes(cid, hi - lo, n)
        self.stats.reads += 1
        # one chunk's slice goes to the kernel as it is (the slot stays referenced until replied)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.stats.bytes_read += len(out)
        self._plan_prefetch(h, layout, off, len(out))  # this layout: a write may have moved the file on
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

    # ---- prefetch ----

    def _queue_range(self, layout: FileLayout, start: int, end: int) -> None:
        self.decoder.prefetch(cid for cid, *_ in layout.extents(start, end - start))

    def _plan_prefetch(self, h: Handle, layout: FileLayout, off: int, size: int) -> None:
        end = off + size
        # kernel readahead sends several requests at once and they complete in any order, so a
        # read counts as sequential when it starts near the furthest point read so far
        if h.next_off - SEQUENTIAL_SLACK <= off <= h.next_off and end < layout.size:
            near = max(end, h.next_off)
            until = min(layout.size, near + self.sequential_ahead)
            if h.queued_layout is not layout:
                h.queued_to, h.queued_layout = -1, layout
            # the far part of the window only once; the near part again, since what was queued
            # there may have been dropped from the queue or evicted before it was read
            self._queue_range(layout, near, min(until, near + SEQUENTIAL_REQUEUE))
            start = max(near + SEQUENTIAL_REQUEUE, h.queued_to)
            if start < until:
                self._queue_range(layout, start, until)
            h.queued_to = max(h.queued_to, until)
        else:
            h.queued_to = -1
        h.next_off = max(h.next_off, end) if off <= h.next_off else end
        i = bisect.bisect_right(h.live.tensor_starts, off) - 1
        if i >= 0 and i not in h.seen_tensors and off < h.live.tensors[i].end:
            h.seen_tensors.add(i)
            t = h.live.tensors[i]
            self._queue_range(layout, end, min(t.end, end + TENSOR_PREFETCH_MAX))

    # ---- a read-only mount (zipfs.fs.writes adds the write path) ----

    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    create = mkdir = mknod = symlink = link = rename = unlink = rmdir = _read_only
    write = setattr = setxattr = removexattr = _read_only
