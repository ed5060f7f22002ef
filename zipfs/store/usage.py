"""Per-model space accounting: logical size, stored size with a share of what it shares, and
what removing it would free.

Each reference to a chunk is attributed to models: a file's reference to the file's model, a
delta chunk's reference to its base to whichever models use that delta chunk (in proportion).
A model's share of a chunk is its fraction of the references; removing the model frees the chunks
whose every reference is its own (a base's chunks stay while a fine-tune's deltas use them).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from zipfs.store.lmdb_store import Store
from zipfs.store.records import ChunkRecord

EPS = 1e-9


@dataclass
class ModelUsage:
    name: str
    files: int = 0
    logical: int = 0
    shared_stored: float = 0.0
    freed_by_rm: int = 0


def _owner(path: str, models: set[str]) -> str:
    """The model a path belongs to: the longest model name that is a prefix, else its top folder."""
    best = ""
    for m in models:
        if (path == m or path.startswith(m + "/")) and len(m) > len(best):
            best = m
    return best or path.split("/", 1)[0]


def usage(store: Store) -> list[ModelUsage]:
    with store.read() as txn:
        models = set(store.models(txn))
        out: dict[str, ModelUsage] = {}
        file_refs: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for path, fid in store.stored_files(txn):
            owner = _owner(path, models)
            mu = out.setdefault(owner, ModelUsage(owner))
            rec = store.file(txn, fid)
            mu.files += 1
            mu.logical += rec.size
            for cid in rec.chunk_ids.tolist():
                file_refs[cid][owner] += 1
        chunks: dict[int, ChunkRecord] = dict(store.iter_chunks(txn))
    # weights of each chunk's references by model; delta chunks first, then their bases
    weight: dict[int, dict[str, float]] = {}
    for cid, refs in file_refs.items():
        total = sum(refs.values())
        weight[cid] = {m: n / total for m, n in refs.items()}
    base_refs: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for cid, cr in chunks.items():
        if cr.base and cid in weight:
            for m, w in weight[cid].items():
                base_refs[cr.base][m] += w
    for cid, cr in chunks.items():
        if cr.refs <= 0:
            continue
        share: dict[str, float] = defaultdict(float)
        for m, n in file_refs.get(cid, {}).items():
            share[m] += n
        for m, w in base_refs.get(cid, {}).items():
            share[m] += w
        total = sum(share.values())
        for m, s in share.items():
            mu = out.setdefault(m, ModelUsage(m))
            mu.shared_stored += cr.stored_len * s / total
            if s >= total - EPS:
                mu.freed_by_rm += cr.stored_len
    return sorted(out.values(), key=lambda u: u.name)
