"""Check a store's integrity: reference counts, missing and orphaned records, and (with scrub)
every chunk's checksum. Repairs only when asked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb

from zipfs.errors import ZipfsError
from zipfs.read.cache import ChunkCache
from zipfs.read.chunks import ChunkSource
from zipfs.store import staging
from zipfs.store.lifecycle import expected_refs
from zipfs.store.lmdb_store import Store
from zipfs.store.records import STAGED, key_u64, u64key


@dataclass
class FsckReport:
    chunks: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    #: unreferenced chunks: not an error (gc frees them)
    garbage: int = 0
    scrubbed: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


def staging_problems(store: Store, txn: lmdb.Transaction) -> list[str]:
    """Staged namespace entries, journal rows and staging files that do not agree.

    A mount's recovery settles tombstones and unacknowledged files; what is reported here is what
    recovery cannot explain (reported, not repaired: the next mount's recovery acts on it).
    """
    journal = {sid: r for sid, r in staging.records(txn, store).items() if r.state == staging.LIVE}
    named = {e.id: p for p, e in store.walk(txn) if e.kind == STAGED}
    out = [f"{p}: staged file #{sid} has no journal record" for sid, p in named.items() if sid not in journal]
    for sid, r in journal.items():
        if sid not in named:
            out.append(f"journal record of staged file #{sid} ({r.path}) has no name")
        elif r.acked and not staging.staging_path(store, sid).exists():
            out.append(f"{r.path}: staging file of #{sid} is missing")
    return out


def fsck(store: Store, scrub: bool = False, repair: bool = False,
         progress: Callable[[int], None] | None = None) -> FsckReport:
    rep = FsckReport()
    with store.ingest_lock(exclusive=repair), store.read() as txn:
        records = dict(store.iter_chunks(txn))
        expected = expected_refs(store, txn, records)
        rep.problems += staging_problems(store, txn)
        payload_ids = {key_u64(bytes(k)) for k in txn.cursor(db=store.db["payloads"]).iternext(values=False)}
        hash_index = {bytes(k): key_u64(bytes(v)) for k, v in txn.cursor(db=store.db["chunkhash"])}
        rep.files = sum(1 for _ in store.stored_files(txn))
    rep.chunks = len(records)
    bad_refs: dict[int, int] = {}
    for cid, want in sorted(expected.items()):
        if cid not in records:
            rep.problems.append(f"chunk {cid} is referenced {want} times but missing")
    for cid, cr in sorted(records.items()):
        want = expected.get(cid, 0)
        if cr.refs != want:
            rep.problems.append(f"chunk {cid}: reference count {cr.refs}, recomputed {want}")
            bad_refs[cid] = want
        if want == 0:
            rep.garbage += 1
        if cid not in payload_ids:
            rep.problems.append(f"chunk {cid}: payload missing")
        if cr.base and cr.base in records and records[cr.base].base:
            rep.problems.append(f"chunk {cid}: base {cr.base} is itself a delta (depth > 1)")
        if cr.hash not in hash_index:
            rep.problems.append(f"chunk {cid}: missing from the content-hash index")
    orphan_payloads = sorted(payload_ids - records.keys())
    rep.problems += [f"payload {cid} has no chunk record" for cid in orphan_payloads]
    dangling = [h for h, cid in hash_index.items() if cid not in records]
    rep.problems += [f"hash index entry {h.hex()[:16]} points at missing chunk {hash_index[h]}"
                     for h in dangling]
    if scrub:
        source = ChunkSource(store, ChunkCache(64 << 20))
        for cid in sorted(records):
            try:
                source.get(cid)
            except ZipfsError as e:
                rep.problems.append(f"chunk {cid}: {e}")
            rep.scrubbed += 1
            if progress:
                progress(records[cid].raw_len)
    if repair and (bad_refs or orphan_payloads or dangling):
        def op(txn: lmdb.Transaction) -> None:
            for cid, want in bad_refs.items():
                cr = store.chunk(txn, cid)
                cr.refs = want
                txn.put(u64key(cid), cr.pack(), db=store.db["chunks"])
            for cid in orphan_payloads:
                txn.delete(u64key(cid), db=store.db["payloads"])
            for h in dangling:
                txn.delete(h, db=store.db["chunkhash"])

        store.writer.call(op)
        rep.repaired = [f"{len(bad_refs)} reference counts set", f"{len(orphan_payloads)} orphan payloads "
                        f"deleted", f"{len(dangling)} dangling hash entries deleted"]
    return rep
