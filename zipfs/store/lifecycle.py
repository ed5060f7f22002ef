"""Removing names and freeing what nothing references.

`rm` drops names and their references in one transaction; chunk payloads stay until `gc`. A
delta chunk holds a reference on its base chunk, so a removed base model's chunks that a
fine-tune still needs stay stored until the fine-tune is removed too. `gc` takes the ingest lock
exclusively: chunks an unfinished ingest has written have no references yet and must stay.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import lmdb

from zipfs.errors import ZipfsError
from zipfs.store import names, staging
from zipfs.store.lmdb_store import Store
from zipfs.store.records import STAGED, ChunkRecord, NsEntry, key_u64, u64key


@dataclass
class RemoveResult:
    files: int = 0
    dirs: int = 0
    logical_bytes: int = 0
    models: list[str] = field(default_factory=list)
    #: removed models that other models still use as base: {base: [dependents]}
    still_needed: dict[str, list[str]] = field(default_factory=dict)


def add_refs(txn: lmdb.Transaction, store: Store, counts: Counter[int], sign: int = 1) -> None:
    """Add (or with sign=-1 remove) references to chunks; a chunk at zero waits for gc."""
    for cid, n in counts.items():
        cr = store.chunk(txn, cid)
        cr.refs += sign * n
        if cr.refs < 0:
            raise ZipfsError(f"chunk {cid} reference count would go negative: run zipfs fsck")
        txn.put(u64key(cid), cr.pack(), db=store.db["chunks"])


def drop(txn: lmdb.Transaction, store: Store, path: str, e: NsEntry, refs: Counter[int],
         dead: list[int]) -> int:
    """Delete one namespace entry; collect the chunk references and staged files it held.

    The caller drops `refs` and, after its commit, purges the `dead` staging files. Returns the
    logical size of a stored file (0 for anything else).
    """
    txn.delete(names.encode(path), db=store.db["ns"])
    if e.kind == STAGED:
        staging.tombstone(txn, store, e.id)
        dead.append(e.id)
    if e.file_id is None:
        return 0
    rec = store.file(txn, e.file_id)
    refs.update(rec.chunk_ids.tolist())
    txn.delete(u64key(e.file_id), db=store.db["files"])
    return rec.size


def remove(store: Store, targets: list[str]) -> RemoveResult:
    """Remove files, links, directories or whole models, all in one transaction."""
    paths = [names.normalize(t) for t in targets]
    if "" in paths:
        raise ZipfsError("refusing to remove the whole store; name what to remove")
    dead: list[int] = []

    def op(txn: lmdb.Transaction) -> RemoveResult:
        res = RemoveResult()
        dead.clear()
        db = store.db
        refs: Counter[int] = Counter()
        for path in paths:
            for p, e in list(store.walk(txn, path)):  # NotFoundError when absent
                res.logical_bytes += drop(txn, store, p, e, refs, dead)
                res.dirs += e.is_dir
                res.files += not e.is_dir
            if txn.delete(names.encode(path), db=db["ns"]):  # a directory: walk yields what is under it
                res.dirs += 1
        add_refs(txn, store, refs, sign=-1)
        models = store.models(txn)
        for m in models:
            if any(m == p or m.startswith(p + "/") for p in paths):
                txn.delete(names.encode(m), db=db["models"])
                res.models.append(m)
        for m, rec in models.items():
            if rec.get("base") in res.models and m not in res.models:
                res.still_needed.setdefault(rec["base"], []).append(m)
        return res

    try:
        res = store.writer.call(op)
    except KeyError as e:
        raise ZipfsError(f"store is inconsistent: {e}; run zipfs fsck") from None
    staging.purge(store, dead)
    return res


@dataclass
class GcResult:
    chunks: int = 0
    bytes: int = 0


def gc(store: Store, batch: int = 1024) -> GcResult:
    """Free every chunk with no references, with its payload and hash index entry.

    One scan finds the unreferenced chunks; they are freed in batches of transactions. Freeing a
    delta chunk drops its reference on its base chunk; a base that reaches zero joins the queue.
    """
    res = GcResult()
    with store.ingest_lock(exclusive=True):
        with store.read() as txn:
            queue = [cid for cid, cr in store.iter_chunks(txn) if cr.refs == 0]
        while queue:
            dead, queue = queue[:batch], queue[batch:]

            def op(txn: lmdb.Transaction, dead: list[int] = dead) -> tuple[int, int, list[int]]:
                n = freed = 0
                bases: Counter[int] = Counter()
                for cid in dead:
                    raw = txn.get(u64key(cid), db=store.db["chunks"])
                    if raw is None:
                        continue
                    cr = ChunkRecord.unpack(raw)
                    if cr.refs:  # referenced again meanwhile
                        continue
                    txn.delete(u64key(cid), db=store.db["chunks"])
                    txn.delete(u64key(cid), db=store.db["payloads"])
                    hit = txn.get(cr.hash, db=store.db["chunkhash"])
                    if hit is not None and key_u64(bytes(hit)) == cid:
                        txn.delete(cr.hash, db=store.db["chunkhash"])
                    if cr.base:
                        bases[cr.base] += 1
                    n += 1
                    freed += cr.stored_len
                add_refs(txn, store, bases, sign=-1)
                return n, freed, [b for b in bases if store.chunk(txn, b).refs == 0]

            n, freed, cascaded = store.writer.call(op)
            res.chunks += n
            res.bytes += freed
            queue += cascaded
    return res


def expected_refs(store: Store, txn: lmdb.Transaction, chunks: dict[int, ChunkRecord]) -> Counter[int]:
    """Reference counts recomputed from file records and the delta bases of `chunks` (fsck)."""
    counts: Counter[int] = Counter()
    for _, fid in store.stored_files(txn):
        counts.update(store.file(txn, fid).chunk_ids.tolist())
    for cr in chunks.values():
        if cr.base:
            counts[cr.base] += 1
    return counts
