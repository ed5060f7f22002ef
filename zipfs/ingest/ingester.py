"""Ingest files into a store: plan -> hash -> dedup -> encode (thread pool) -> one commit per file.

A file is read in bounded windows with pread (a 20 GB sparse file costs a few MiB of memory,
not a mapping of 20 GB), each chunk once: the same bytes are hashed by chunk (BLAKE3, the
content address), by file (sha256, in its own thread, in order) and encoded. Bytes cut at
content-defined boundaries are read once more before that, in 16 MiB windows, to find the
boundaries (the second read comes from the page cache). Chunk payloads are
written in batches while the file is read; they carry no references until the file's final
transaction, which adds the file version, every reference and (through the caller's `commit`)
the inode that shows it, at once. A failed ingest deletes the chunks it wrote that nothing
references; a crash before the commit leaves them for gc. Never a half-visible file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import lmdb
import numpy as np

from zipfs import faults
from zipfs.codec import chunk as codec
from zipfs.errors import ZipfsError
from zipfs.formats.safetensors import DType, Segment
from zipfs.ingest import encoding
from zipfs.ingest.base import BaseRef, resolve_base
from zipfs.ingest.plan import DEFAULT_CHUNK, open_regular, plan_fd, pread_exact
from zipfs.read.chunks import ChunkSource
from zipfs.store import inodes, journal
from zipfs.store import records as rec
from zipfs.store.lifecycle import add_refs, free_chunks
from zipfs.store.lmdb_store import Store
from zipfs.store.records import ChunkRecord, FileRecord, TensorEntry, key_u64, u64key

log = logging.getLogger("zipfs.ingest")

#: a delta is kept without trying standalone coding when it is at most this fraction of raw,
DELTA_GOOD_ENOUGH = 0.5
#: or at most this fraction of what its base chunk's own coding takes (a fine-tune's chunk codes
#: standalone to about what its base does): the standalone try cost 1.5 of 5.7 ms per MB of a
#: fine-tune's ingest, and won on few chunks
BELOW_BASE_PLAIN = 0.97

#: base refs for the chunks of one tensor of the file being ingested, or None
BaseLookup = Callable[[Segment], "list[BaseRef] | None"]
#: runs in a file's commit transaction once its version (file id, record) is in the store, and
#: makes an inode show it; raising aborts the commit (e.g. a staged file superseded meanwhile)
Commit = Callable[[lmdb.Transaction, int, FileRecord, inodes.Released], None]


@dataclass
class FileReport:
    """What ingesting one file did."""

    name: str
    size: int
    kind: str
    note: str
    chunks: int
    reused_chunks: int
    delta_chunks: int
    new_bytes: int
    seconds: float
    file_id: int = 0


@dataclass
class _Prepared:
    hash: bytes
    data: bytes  # the raw bytes, until the file's sha256 has seen them
    chunk_id: int | None = None  # set when the chunk is already stored
    record: ChunkRecord | None = None
    payload: bytes = b""


@dataclass
class _Session:
    """State shared by the files of one ingest run: chunks written but not yet committed."""

    pending: dict[bytes, Future[int]] = field(default_factory=dict)


def _delta_good_enough(size: int, nbytes: int, plain_hint: float | None) -> bool:
    """Whether a delta of `size` bytes is kept without also trying standalone coding."""
    return size <= DELTA_GOOD_ENOUGH * nbytes or (plain_hint is not None
                                                  and size <= BELOW_BASE_PLAIN * plain_hint)


def _chunk_kind(enc: codec.Encoded, delta: int) -> int:
    if delta == codec.SUB:
        return rec.DELTA_SUB
    if delta == codec.XOR:
        return rec.DELTA_XOR
    return rec.CONST if enc.is_const else rec.STANDALONE


class Ingester:
    """Ingests files into one store with a pool of encoding threads."""

    def __init__(self, store: Store, workers: int | None = None, chunk_size: int = DEFAULT_CHUNK,
                 level: int = codec.DEFAULT_LEVEL,
                 progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.workers = workers or os.cpu_count() or 1
        self.chunk_size = chunk_size
        self.level = level
        self.progress = progress
        self.source = ChunkSource(store)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="zipfs-encode")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="zipfs-sha256")
        self._session = _Session()
        #: set to stop an ingest in progress (a mount shutting down); the file is not committed
        self.cancelled = threading.Event()

    def close(self) -> None:
        self._pool.shutdown()
        self._hasher.shutdown()

    def __enter__(self) -> Ingester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- worker side ----

    def _prepare(self, fd: int, s: int, e: int, dtype: DType, ref: BaseRef | None) -> _Prepared:
        """Read and hash one chunk; if it is new, encode it (as a delta when that is smaller, as
        its own bytes when coding would not make it smaller)."""
        data = pread_exact(fd, e - s, s)
        h = blake3.blake3(data).digest()
        with self.store.read() as txn:
            hit = self.store.get(txn, "chunkhash", h)
            if hit is not None:
                return _Prepared(h, data, chunk_id=key_u64(hit))
        resolved = resolve_base(self.store, self.source, ref, len(data)) if ref else None
        best, delta = None, codec.NONE
        if resolved is not None:
            best = encoding.delta(data, dtype, resolved.raw, self.level)
            delta = encoding.delta_mode(dtype)
        if best is None or not _delta_good_enough(len(best.payload), len(data), resolved.plain_hint):
            plain = encoding.plain(data, dtype, self.level)
            if best is None or len(plain.payload) <= len(best.payload):
                best, delta = plain, codec.NONE
        base = resolved.ref if delta else BaseRef(0)
        kind, payload = _chunk_kind(best, delta), best.payload
        frame = codec.lone_frame(payload) if not delta else None
        if frame is not None:
            kind, payload = rec.FRAME, frame
        if len(payload) >= len(data):
            kind, payload, base = rec.VERBATIM, data, BaseRef(0)
        record = ChunkRecord(codec.checksum(data), base.chunk_id, len(data), len(payload), 0, kind,
                             base.off, base.xform, h)
        return _Prepared(h, data, record=record, payload=payload)

    # ---- writer side ----

    def _put_chunk(self, prep: _Prepared) -> Callable[[lmdb.Transaction], int]:
        def op(txn: lmdb.Transaction) -> int:
            hit = self.store.get(txn, "chunkhash", prep.hash)
            if hit is not None:  # stored meanwhile by another ingest
                return key_u64(hit)
            cid = self.store.next_id(txn, b"next_chunk")
            self.store.put(txn, "chunks", u64key(cid), prep.record.pack(), overwrite=False)
            txn.put(u64key(cid), prep.payload, db=self.store.db["payloads"])
            self.store.put(txn, "chunkhash", prep.hash, u64key(cid))
            if prep.record.base:
                add_refs(self.store, txn, Counter({prep.record.base: 1}))
            return cid
        return op

    def _commit_file(self, frec: FileRecord, commit: Commit,
                     rel: inodes.Released) -> Callable[[lmdb.Transaction], int]:
        def op(txn: lmdb.Transaction) -> int:
            rel.dead.clear()
            rel.removed.clear()
            fid = self.store.next_id(txn, b"next_file")
            faults.point("ingest-commit")
            add_refs(self.store, txn, Counter(frec.chunk_ids.tolist()))
            self.store.put(txn, "files", u64key(fid), frec.pack(), overwrite=False)
            commit(txn, fid, frec, rel)
            return fid
        return op

    def _discard(self, cids: list[int]) -> None:
        """Delete chunks a failed ingest wrote that nothing references (after all)."""
        if not cids:
            return
        try:
            self.store.writer.call(lambda txn: free_chunks(self.store, txn, cids), frees_space=True)
        except ZipfsError as e:
            log.warning("could not delete the %d chunks of a failed ingest (gc will): %s", len(cids), e)

    # ---- driver ----

    def ingest_file(self, src: Path | int, name: str, commit: Commit,
                    base_lookup: BaseLookup | None = None, size: int | None = None,
                    expect: os.stat_result | None = None) -> FileReport:
        """Store one file (a path, or an open descriptor and its size) as a new version; `commit`
        makes an inode show it. All-or-nothing. expect: see plan.open_regular."""
        t0 = time.perf_counter()
        fd = open_regular(src, expect) if isinstance(src, Path) else src
        try:
            whole = None
            if size is None:
                whole = os.fstat(fd)
                size = whole.st_size
            return self._ingest_fd(fd, size, name, commit, base_lookup, t0, whole)
        except OSError as e:
            raise ZipfsError(f"cannot read {src if isinstance(src, Path) else name}: {e.strerror}") from None
        finally:
            if isinstance(src, Path):
                os.close(fd)

    def _ingest_fd(self, fd: int, size: int, name: str, commit: Commit, base_lookup: BaseLookup | None,
                   t0: float, whole: os.stat_result | None = None) -> FileReport:
        """whole: the file's fstat when the whole of it is stored; it must read as that at the end."""
        plan = plan_fd(fd, size, name)
        units = plan.units()
        window: deque[tuple[int, int, Future[_Prepared]]] = deque()  # (unit, raw length, job)
        offsets: list[int] = []
        ids: list[int | Future[int]] = []
        written: list[Future[int]] = []
        seg_hashes: dict[int, list[bytes]] = {}
        stats: Counter[str] = Counter()
        sha = hashlib.sha256()
        hashed: deque[Future[None]] = deque()
        max_window = 4 * self.workers

        def drain_one() -> None:
            si, nbytes, fut = window.popleft()
            prep = fut.result()
            hashed.append(self._hasher.submit(sha.update, prep.data))  # one thread: in file order
            while len(hashed) > max_window:  # bounded: the bytes wait in memory until hashed
                hashed.popleft().result()
            seg_hashes.setdefault(si, []).append(prep.hash)
            if prep.chunk_id is not None:
                ids.append(prep.chunk_id)
                stats["reused"] += 1
            elif prep.hash in self._session.pending:
                ids.append(self._session.pending[prep.hash])
                stats["reused"] += 1
            else:
                f = self.store.writer.submit(self._put_chunk(prep), size=len(prep.payload))
                self._session.pending[prep.hash] = f
                ids.append(f)
                written.append(f)
                stats["new_bytes"] += len(prep.payload)
                stats["delta"] += bool(prep.record.base)
            faults.point("ingest-chunk")
            if self.cancelled.is_set():
                raise ZipfsError(f"{name}: ingest cancelled")
            if self.progress:
                self.progress(nbytes)

        try:
            for si, seg in enumerate(units):
                refs = base_lookup(seg) if base_lookup and seg.tensor else None
                for ci, (s, e) in enumerate(plan.ranges(fd, seg, self.chunk_size)):
                    ref = refs[ci] if refs and ci < len(refs) else None
                    offsets.append(s)
                    window.append((si, e - s, self._pool.submit(self._prepare, fd, s, e, seg.dtype, ref)))
                    if len(window) >= max_window:
                        drain_one()
            while window:
                drain_one()
            chunk_ids = np.array([i if isinstance(i, int) else i.result() for i in ids], dtype=np.uint64)
            while hashed:
                hashed.popleft().result()
            own = {seg.tensor.name: si for si, seg in enumerate(units) if seg.tensor is not None}
            tensors = []
            for seg in plan.segments:
                if (t := seg.tensor) is None:
                    continue
                # a tensor merged into a run of small ones has no chunks of its own, nor a digest
                digest = blake3.blake3(b"".join(seg_hashes[own[t.name]])).hexdigest() if t.name in own else ""
                tensors.append(TensorEntry(t.name, t.dtype.name, list(t.shape), t.start, t.end, digest))
            if whole is not None:
                _unchanged(fd, whole, name)
            frec = FileRecord(size=size, sha256=sha.hexdigest(), kind=plan.kind,
                              offsets=np.array(offsets, dtype=np.uint64), chunk_ids=chunk_ids,
                              tensors=tensors, note=plan.note, new_bytes=stats["new_bytes"],
                              reused_chunks=stats["reused"])
            rel = inodes.Released()
            fid = self.store.writer.call(self._commit_file(frec, commit, rel))
        except BaseException:
            for _, _, fut in window:
                fut.cancel()
            wait(written)
            self._session.pending.clear()  # the hash index answers for what did get written
            self._discard([f.result() for f in written if f.exception() is None])
            raise
        faults.point("ingest-committed")
        journal.purge(self.store, rel.dead)
        for hs in seg_hashes.values():  # committed: the store's hash index answers for them now
            for h in hs:
                self._session.pending.pop(h, None)
        return FileReport(name, size, plan.kind, plan.note, len(ids), stats["reused"],
                          stats["delta"], stats["new_bytes"], time.perf_counter() - t0, fid)


def _unchanged(fd: int, st: os.stat_result, name: str) -> None:
    """ZipfsError when the file changed while it was read, or holds more than its size says (a
    /proc file, say): what was read is not the file."""
    now = os.fstat(fd)
    if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or os.pread(fd, 1, st.st_size):
        raise ZipfsError(f"{name}: changed while being read, or holds more than its size says; not stored")
