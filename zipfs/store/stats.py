"""Store-wide figures: logical vs stored bytes, dedup, per-codec breakdown."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from zipfs.store import staging
from zipfs.store.lmdb_store import Store
from zipfs.store.records import KIND_NAMES


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
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    #: per model: its base, logical size, bytes it added, delta chunks
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
        for _, fid in store.stored_files(txn):
            rec = store.file(txn, fid)
            s.files += 1
            s.logical_bytes += rec.size
            s.reused_chunks += rec.reused_chunks
        for r in staging.records(txn, store).values():
            if r.state == staging.LIVE:
                s.staged_files += 1
                s.staged_bytes += r.size
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
        keys = ("base", "size", "new_bytes", "delta_chunks", "reason")
        s.models = {name: {k: rec.get(k) for k in keys} for name, rec in store.models(txn).items()}
    s.by_kind = {k: {"chunks": counts[k], "raw_bytes": raw[k], "stored_bytes": stored[k]}
                 for k in sorted(counts)}
    data = store.path / "lmdb" / "data.mdb"
    s.disk_bytes = data.stat().st_blocks * 512 if data.exists() else 0
    return s
