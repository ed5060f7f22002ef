"""Removing names and freeing what nothing uses any more.

`rm` removes names in one transaction; a file version whose inode loses its last name becomes
an orphan, still holding its chunk references. `gc` frees orphans whose inode no live process
pins (an open handle in a mount keeps reading a removed file), then every chunk with no
references, with its payload; a delta chunk holds a reference on its base chunk, so a removed
base model's chunks that a fine-tune still needs stay. gc takes the ingest lock exclusively:
chunks an unfinished ingest has written have no references yet and must stay. Both work on a
full disk: their commits get the store's reserve given back when they fail for lack of space.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import lmdb

from zipfs.errors import StoreError, ZipfsError
from zipfs.store import inodes, journal, models, names, pins
from zipfs.store.lmdb_store import Store
from zipfs.store.records import ChunkRecord, DamagedRecord, FileRecord, key_u64, u64key


@dataclass
class RemoveResult:
    files: int = 0
    dirs: int = 0
    logical_bytes: int = 0
    models: list[str] = field(default_factory=list)
    #: removed models that other models still use as base: {base: [dependents]}
    still_needed: dict[str, list[str]] = field(default_factory=dict)


def add_refs(store: Store, txn: lmdb.Transaction, counts: Counter[int], sign: int = 1) -> None:
    """Add (or with sign=-1 remove) references to chunks; a chunk at zero waits for gc."""
    for cid, n in counts.items():
        cr = store.chunk(txn, cid)
        cr.refs += sign * n
        if cr.refs < 0:
            raise StoreError(f"chunk {cid} reference count would go negative: run zipfs fsck --repair")
        store.put(txn, "chunks", u64key(cid), cr.pack())


def remove(store: Store, targets: list[str]) -> RemoveResult:
    """Remove files, links, directories or whole models, all in one transaction."""
    paths = [names.normalize(t) for t in targets]
    if "" in paths:
        raise ZipfsError("refusing to remove the whole store; name what to remove")
    rel = inodes.Released()

    def op(txn: lmdb.Transaction) -> RemoveResult:
        res = RemoveResult()
        rel.dead.clear()
        rel.removed.clear()
        named = models.named(store, txn)
        for path in paths:
            res.logical_bytes += sum(n.size for _, n in inodes.walk(store, txn, path) if n.is_reg)
            files, dirs = inodes.remove_tree(store, txn, path, time.time_ns(), rel)
            res.files += files
            res.dirs += dirs
        gone = set(rel.removed)
        by_ino = {m.ino: n for n, m in named.items()}
        res.models = sorted(n for n, m in named.items() if m.ino in gone)
        for name, m in named.items():
            if m.base in gone and m.ino not in gone and m.base in by_ino:
                res.still_needed.setdefault(by_ino[m.base], []).append(name)
        return res

    res = store.writer.call(op, frees_space=True)
    journal.purge(store, rel.dead)
    return res


def free_chunks(store: Store, txn: lmdb.Transaction, cids: list[int]) -> tuple[int, int, list[int]]:
    """Delete those of cids nothing references (with payload or remote location, and hash index
    entry), dropping
    their references on delta bases: (chunks freed, payload bytes freed, bases now at zero)."""
    n = freed = 0
    bases: Counter[int] = Counter()
    for cid in cids:
        raw = store.get(txn, "chunks", u64key(cid))
        if raw is None or (cr := ChunkRecord.unpack(raw)).refs:  # gone, or referenced again meanwhile
            continue
        store.delete(txn, "chunks", u64key(cid))
        local = store.delete(txn, "payloads", u64key(cid))
        store.delete(txn, "rlocs", u64key(cid))  # where the remote has it: this store forgets it
        hit = store.get(txn, "chunkhash", cr.hash)
        if hit is not None and key_u64(hit) == cid:
            store.delete(txn, "chunkhash", cr.hash)
        if cr.base:
            bases[cr.base] += 1
        n += 1
        freed += cr.stored_len if local else 0
    add_refs(store, txn, bases, sign=-1)
    return n, freed, [b for b in bases if store.chunk(txn, b).refs == 0]


@dataclass
class GcResult:
    chunks: int = 0
    bytes: int = 0
    #: file versions freed (removed or replaced files no reader held any more)
    files: int = 0
    #: file versions kept because a process still reads their inode
    pinned: int = 0
    #: orphans that could not be freed (their record is damaged): fsck --repair recounts
    damaged: list[str] = field(default_factory=list)


def _reap_orphans(store: Store, res: GcResult) -> list[int]:
    """Free orphaned file versions no live process pins; purge tombstoned versions' files."""
    def op(txn: lmdb.Transaction) -> list[int]:
        pinned = pins.live(store.path)  # read inside the transaction: see pins.py
        res.files = res.pinned = 0
        res.damaged.clear()
        refs: Counter[int] = Counter()
        for k, v in list(store.scan(txn, "orphans", on_damage=lambda k, e: res.damaged.append(str(e)))):
            if key_u64(v) in pinned:
                res.pinned += 1
                continue
            raw = store.get(txn, "files", k)
            if raw is not None:
                try:
                    refs.update(FileRecord.unpack(raw).chunk_ids.tolist())
                except DamagedRecord as e:
                    res.damaged.append(f"file version {key_u64(k)}: {e}")
                    continue
                store.delete(txn, "files", k)
            store.delete(txn, "orphans", k)
            res.files += 1
        add_refs(store, txn, refs, sign=-1)
        return [sid for sid, r in journal.records(store, txn).items() if r.state != journal.LIVE]

    return store.writer.call(op, frees_space=True)


def gc(store: Store, batch: int = 1024) -> GcResult:
    """Free unpinned orphans, then every chunk with no references, with its payload and hash
    index entry. Freeing a delta chunk drops its reference on its base chunk; a base that
    reaches zero joins the queue."""
    res = GcResult()
    store.check_tree()  # it walks every chunk, orphan and pin
    with store.ingest_lock(exclusive=True):
        journal.purge(store, _reap_orphans(store, res))
        with store.read() as txn:
            chunks = store.iter_chunks(txn, on_damage=lambda k, e: res.damaged.append(str(e)))
            queue = [cid for cid, cr in chunks if cr.refs == 0]
        while queue:
            dead, queue = queue[:batch], queue[batch:]

            n, freed, cascaded = store.writer.call(lambda txn, d=dead: free_chunks(store, txn, d),
                                                   frees_space=True)
            res.chunks += n
            res.bytes += freed
            queue += cascaded
    store.ensure_reserve()
    return res


def file_records(store: Store, txn: lmdb.Transaction,
                 on_damage: inodes.OnDamage | None = None) -> dict[int, FileRecord]:
    """Every file version in the store (live and orphaned), by file id."""
    out: dict[int, FileRecord] = {}
    for k, v in store.scan(txn, "files", on_damage=None if on_damage is None
                           else lambda k, e: on_damage(f"file version {key_u64(k)}", e)):
        try:
            out[key_u64(k)] = FileRecord.unpack(v)
        except DamagedRecord as e:
            if on_damage is None:
                raise
            on_damage(f"file version {key_u64(k)}", e)
    return out


def expected_refs(files: dict[int, FileRecord], chunks: dict[int, ChunkRecord]) -> Counter[int]:
    """Reference counts recomputed from every file version and the delta bases of `chunks` (fsck)."""
    counts: Counter[int] = Counter()
    for rec in files.values():
        counts.update(rec.chunk_ids.tolist())
    for cr in chunks.values():
        if cr.base:
            counts[cr.base] += 1
    return counts
