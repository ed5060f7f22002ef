"""Store-wide figures: logical vs stored bytes, dedup, per-codec breakdown."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from zipfs.store import hub, inodes, journal, models
from zipfs.store.lmdb_store import Store
from zipfs.store.records import KIND_NAMES
from zipfs.store.usage import owner, stored_files


@dataclass
class Stats:
    files: int = 0
    logical_bytes: int = 0
    #: payload bytes of chunks that something references
    stored_bytes: int = 0
    #: payload bytes of unreferenced chunks (gc frees them)
    garbage_bytes: int = 0
    chunks: int = 0
    reused_chunks: int = 0
    #: size of the LMDB data file on disk (allocated blocks)
    disk_bytes: int = 0
    #: written through a mount, not yet ingested (the backlog)
    staged_files: int = 0
    staged_bytes: int = 0
    #: removed or replaced file versions still held (by a reader, or until gc)
    orphans: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    #: per model (by path): its display name (a hub id for a hub repo folder), base, logical size,
    #: bytes its files added, delta chunks
    models: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.logical_bytes if self.logical_bytes else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratio": self.ratio}


def compute(store: Store) -> Stats:
    s = Stats()
    counts: Counter[str] = Counter()
    raw: Counter[str] = Counter()
    stored: Counter[str] = Counter()
    with store.read() as txn:
        named = models.named(store, txn)
        shown = hub.displays(named)
        s.models = {name: {"display_name": shown[name],
                           "base": inodes.describe(store, txn, m.base) if m.base else None, "size": 0,
                           "new_bytes": 0, "delta_chunks": m.delta_chunks, "reason": m.reason}
                    for name, m in named.items()}
        for path, rec in stored_files(store, txn):
            s.files += 1
            s.logical_bytes += rec.size
            s.reused_chunks += rec.reused_chunks
            m = s.models.get(owner(path, named))
            if m is not None:
                m["size"] += rec.size
                m["new_bytes"] += rec.new_bytes
        for r in journal.records(store, txn).values():
            if r.state == journal.LIVE and r.acked:
                s.staged_files += 1
                s.staged_bytes += r.size
        s.orphans = sum(1 for _ in store.scan(txn, "orphans"))
        for _, cr in store.iter_chunks(txn):
            if cr.refs <= 0:
                s.garbage_bytes += cr.stored_len
                continue
            kind = KIND_NAMES.get(cr.kind, str(cr.kind))
            s.chunks += 1
            s.stored_bytes += cr.stored_len
            counts[kind] += 1
            raw[kind] += cr.raw_len
            stored[kind] += cr.stored_len
    s.by_kind = {k: {"chunks": counts[k], "raw_bytes": raw[k], "stored_bytes": stored[k]}
                 for k in sorted(counts)}
    data = store.path / "lmdb" / "data.mdb"
    s.disk_bytes = data.stat().st_blocks * 512 if data.exists() else 0
    return s
