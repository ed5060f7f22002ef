"""Ingest files into a store: plan -> hash -> dedup -> encode (thread pool) -> one commit per file.

Chunk payloads are written in batches while a file is being read (so memory stays bounded by the
in-flight window, not the file size); they carry no references until the file's final
transaction, which adds the file record, its name and every reference at once. A crash before
that leaves unreferenced chunks, which gc frees; never a half-visible file.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import lmdb
import numpy as np

from zipfs import faults
from zipfs.codec import chunk as codec
from zipfs.errors import ZipfsError
from zipfs.formats.safetensors import Segment
from zipfs.ingest.base import BaseRef, resolve_base
from zipfs.ingest.plan import DEFAULT_CHUNK, chunk_ranges, plan_file
from zipfs.read.chunks import ChunkSource
from zipfs.store import names, staging
from zipfs.store import records as rec
from zipfs.store.lifecycle import add_refs, drop
from zipfs.store.lmdb_store import Store
from zipfs.store.records import ChunkRecord, FileRecord, TensorEntry, key_u64, u64key

#: a delta is kept without trying standalone coding when it is at most this fraction of raw
DELTA_GOOD_ENOUGH = 0.5

#: base refs for the chunks of one tensor of the file being ingested, or None
BaseLookup = Callable[[Segment], "list[BaseRef] | None"]
#: runs first in a file's commit transaction and returns the path to commit to; raising aborts
#: the commit (a staged file that was removed or rewritten meanwhile)
Claim = Callable[[lmdb.Transaction], str]


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
class _Target:
    """Where and as what one file is being stored."""

    dest: str
    model: str
    base_lookup: BaseLookup | None
    claim: Claim | None


@dataclass
class _Prepared:
    hash: bytes
    chunk_id: int | None = None  # set when the chunk is already stored
    record: ChunkRecord | None = None
    payload: bytes = b""


@dataclass
class _Session:
    """State shared by the files of one ingest run: chunks written but not yet committed."""

    pending: dict[bytes, Future[int]] = field(default_factory=dict)


def _chunk_kind(enc: codec.Encoded, delta: int) -> int:
    if delta == codec.SUB:
        return rec.DELTA_SUB
    if delta == codec.XOR:
        return rec.DELTA_XOR
    return rec.CONST if enc.is_const else rec.STANDALONE


def iter_source_files(src: Path) -> Iterator[tuple[Path, str]]:
    """(path on disk, relative name) of the regular files under src (symlinks followed)."""
    if not src.is_dir():
        yield src, ""
        return
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            if p.is_file():
                yield p, p.relative_to(src).as_posix()


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
        self._session = _Session()
        #: set to stop an ingest in progress (a mount shutting down); the file is not committed
        self.cancelled = threading.Event()

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> Ingester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- worker side ----

    def _prepare(self, data: memoryview, width: int, exp8: bool, ref: BaseRef | None) -> _Prepared:
        """Hash one chunk; if it is new, encode it (as a delta when that is smaller)."""
        h = blake3.blake3(data).digest()
        with self.store.read() as txn:
            hit = txn.get(h, db=self.store.db["chunkhash"])
            if hit is not None:
                return _Prepared(h, chunk_id=key_u64(bytes(hit)))
        resolved = resolve_base(self.store, self.source, ref, len(data)) if ref else None
        best, delta = None, codec.NONE
        if resolved is not None:
            best = codec.encode(data, width, exp8, base=resolved[1], delta=codec.SUB, level=self.level)
            delta = codec.SUB
        if best is None or len(best.payload) > DELTA_GOOD_ENOUGH * len(data):
            plain = codec.encode(data, width, exp8, level=self.level)
            if best is None or len(plain.payload) <= len(best.payload):
                best, delta = plain, codec.NONE
        base = resolved[0] if delta else BaseRef(0)
        record = ChunkRecord(codec.checksum(data), base.chunk_id, len(data), len(best.payload), 0,
                             _chunk_kind(best, delta), base.off, base.xform, h)
        return _Prepared(h, record=record, payload=best.payload)

    # ---- writer side ----

    def _put_chunk(self, prep: _Prepared) -> Callable[[lmdb.Transaction], int]:
        def op(txn: lmdb.Transaction) -> int:
            db = self.store.db
            hit = txn.get(prep.hash, db=db["chunkhash"])
            if hit is not None:  # stored meanwhile by another ingest
                return key_u64(bytes(hit))
            cid = self.store.next_id(txn, b"next_chunk")
            txn.put(u64key(cid), prep.record.pack(), db=db["chunks"])
            txn.put(u64key(cid), prep.payload, db=db["payloads"])
            txn.put(prep.hash, u64key(cid), db=db["chunkhash"])
            if prep.record.base:
                add_refs(txn, self.store, Counter({prep.record.base: 1}))
            return cid
        return op

    def _commit_file(self, path: str, frec: FileRecord, dead: list[int],
                     claim: Claim | None = None) -> Callable[[lmdb.Transaction], int]:
        def op(txn: lmdb.Transaction) -> int:
            db = self.store.db
            dest = claim(txn) if claim else path
            staging.ensure_parents(txn, self.store, dest)
            old = txn.get(names.encode(dest), db=db["ns"])
            refs: Counter[int] = Counter()
            dead.clear()
            if old is not None:
                entry = rec.ns_unpack(old)
                if entry.is_dir:
                    raise ZipfsError(f"{dest}: is a directory in the store")
                drop(txn, self.store, dest, entry, refs, dead)
            fid = self.store.next_id(txn, b"next_file")
            faults.point("ingest-commit")
            net = Counter(frec.chunk_ids.tolist())
            net.subtract(refs)
            add_refs(txn, self.store, Counter({c: n for c, n in net.items() if n}))
            txn.put(u64key(fid), frec.pack(), db=db["files"])
            txn.put(names.encode(dest), rec.ns_file(fid), db=db["ns"])
            return fid
        return op

    # ---- driver ----

    def ingest_file(self, src: Path, dest: str, model: str = "",
                    base_lookup: BaseLookup | None = None, claim: Claim | None = None) -> FileReport:
        """Store one file under `dest` (or where `claim` says at commit time); all-or-nothing."""
        target = _Target(names.normalize(dest), model, base_lookup, claim)
        if not target.dest:
            raise ZipfsError("cannot store a file at the store root; give it a name")
        t0 = time.perf_counter()
        try:
            with open(src, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                mtime_ns = os.fstat(f.fileno()).st_mtime_ns
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise ZipfsError(f"cannot read {src}: {e.strerror}") from None
        try:
            view = memoryview(mm) if mm is not None else memoryview(b"")
            try:
                return self._ingest_view(view, size, mtime_ns, target, t0)
            finally:
                view.release()
        finally:
            if mm is not None:
                mm.close()

    def _ingest_view(self, view: memoryview, size: int, mtime_ns: int, target: _Target,
                     t0: float) -> FileReport:
        sha = self._pool.submit(lambda: hashlib.sha256(view).hexdigest())
        try:
            return self._encode_and_commit(view, size, mtime_ns, target, t0, sha)
        except BaseException:
            self._session.pending.clear()  # the hash index answers for what did get written
            raise

    def _encode_and_commit(self, view: memoryview, size: int, mtime_ns: int, target: _Target,
                           t0: float, sha: Future[str]) -> FileReport:
        plan = plan_file(target.dest, view, size)
        window: deque[tuple[int, int, Future[_Prepared]]] = deque()  # (segment, raw length, job)
        offsets: list[int] = []
        ids: list[int | Future[int]] = []
        seg_hashes: dict[int, list[bytes]] = {}
        stats = Counter()
        max_window = 4 * self.workers

        def drain_one() -> None:
            si, nbytes, fut = window.popleft()
            prep = fut.result()
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
                stats["new_bytes"] += len(prep.payload)
                stats["delta"] += bool(prep.record.base)
            faults.point("ingest-chunk")
            if self.cancelled.is_set():
                raise ZipfsError(f"{target.dest}: ingest cancelled")
            if self.progress:
                self.progress(nbytes)

        for si, seg in enumerate(plan.segments):
            refs = target.base_lookup(seg) if target.base_lookup and seg.tensor else None
            for ci, (s, e) in enumerate(chunk_ranges(seg, self.chunk_size)):
                ref = refs[ci] if refs and ci < len(refs) else None
                offsets.append(s)
                window.append((si, e - s, self._pool.submit(self._prepare, view[s:e], seg.dtype.width,
                                                    seg.dtype.exp8, ref)))
                if len(window) >= max_window:
                    drain_one()
        while window:
            drain_one()
        chunk_ids = np.array([i if isinstance(i, int) else i.result() for i in ids], dtype=np.uint64)
        tensors = []
        for si, seg in enumerate(plan.segments):
            if seg.tensor is None:
                continue
            t = seg.tensor
            digest = blake3.blake3(b"".join(seg_hashes[si]))
            tensors.append(TensorEntry(t.name, t.dtype.name, list(t.shape), t.start, t.end,
                                       digest.hexdigest()))
        frec = FileRecord(size=size, sha256=sha.result(), kind=plan.kind, mtime_ns=mtime_ns,
                          offsets=np.array(offsets, dtype=np.uint64), chunk_ids=chunk_ids,
                          tensors=tensors, note=plan.note, new_bytes=stats["new_bytes"],
                          reused_chunks=stats["reused"], model=target.model)
        dead: list[int] = []
        fid = self.store.writer.call(self._commit_file(target.dest, frec, dead, target.claim))
        faults.point("ingest-committed")
        staging.purge(self.store, dead)
        for hs in seg_hashes.values():  # committed: the store's hash index answers for them now
            for h in hs:
                self._session.pending.pop(h, None)
        return FileReport(target.dest, size, plan.kind, plan.note, len(ids), stats["reused"],
                          stats["delta"], stats["new_bytes"], time.perf_counter() - t0, fid)
