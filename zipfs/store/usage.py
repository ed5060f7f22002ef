"""Per-model space accounting: logical size, stored size with a share of what it shares, and
what removing it would free.

Each reference to a chunk is attributed to models: a file's reference to the file's model, a
delta chunk's reference to its base to whichever models use that delta chunk (in proportion).
A model's share of a chunk is its fraction of the references; removing the model frees the chunks
whose every reference is its own (a base's chunks stay while a fine-tune's deltas use them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from zipfs.store import hub, inodes, models
from zipfs.store.lmdb_store import Store
from zipfs.store.records import ChunkRecord, DamagedRecord, FileRecord

EPS = 1e-9


@dataclass
class ModelUsage:
    name: str
    #: how the model is shown (a hub repo folder by its hub id)
    display_name: str = ""
    files: int = 0
    logical: int = 0
    shared_stored: float = 0.0
    freed_by_rm: int = 0


def owner(path: str, model_names: set[str] | dict) -> str:
    """The model a path belongs to: the nearest enclosing model (or itself), else its top folder."""
    parts = path.split("/")
    for i in range(len(parts), 0, -1):
        if "/".join(parts[:i]) in model_names:
            return "/".join(parts[:i])
    return parts[0]


def stored_files(store: Store, txn: lmdb.Transaction,
                 on_damage: inodes.OnDamage | None = None) -> Iterator[tuple[str, FileRecord]]:
    """(path, file record) of every stored file in the store."""
    for path, node in inodes.walk(store, txn, "", on_damage=on_damage):
        if node.is_reg and node.content == inodes.STORED:
            try:
                yield path, store.file(txn, node.content_id)
            except DamagedRecord as e:
                if on_damage is None:
                    raise
                on_damage(path, e)


def usage(store: Store) -> list[ModelUsage]:
    with store.read() as txn:
        model_names = set(models.named(store, txn))
        out: dict[str, ModelUsage] = {}
        file_refs: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for path, rec in stored_files(store, txn):
            o = owner(path, model_names)
            mu = out.setdefault(o, ModelUsage(o))
            mu.files += 1
            mu.logical += rec.size
            for cid in rec.chunk_ids.tolist():
                file_refs[cid][o] += 1
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
    for name, shown in hub.displays(out).items():
        out[name].display_name = shown
    return sorted(out.values(), key=lambda u: u.name)
