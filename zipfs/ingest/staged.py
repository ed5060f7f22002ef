"""Ingest one staged file (written through the mount) with the same pipeline as `zipfs ingest`.

The file's model is its directory. The first tensor file of a model chooses a base the way
`zipfs ingest` does (sampled delta coding against stored models); later files of that model
reuse the choice recorded in the models table. The commit claims the staged entry wherever a
rename has moved it meanwhile, and aborts when the file was removed or replaced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from zipfs.ingest.base import BaseChoice, choose_base, stored_index
from zipfs.ingest.ingester import FileReport, Ingester
from zipfs.store import names, staging


@dataclass
class StagedIngest:
    report: FileReport
    path: str  # where the file was committed
    base: str | None


def model_of(path: str) -> str:
    """The model a file belongs to: its directory (a top-level file is a model of its own)."""
    return path.rpartition("/")[0] or path


def _base_for(ing: Ingester, model: str, src: Path, dest: str,
              cache: dict[str, BaseChoice]) -> BaseChoice:
    if model in cache:
        return cache[model]
    store = ing.store
    with store.read() as txn:
        known = store.models(txn).get(model)
    if known and known.get("base"):
        choice = BaseChoice(known["base"], known.get("reason", "recorded"), known.get("ratio", 1.0),
                            index=stored_index(store, known["base"]), chunk_size=ing.chunk_size)
    else:
        choice = choose_base(store, model, [(src, dest)], None, chunk_size=ing.chunk_size)
        if choice.reason == "no safetensors tensors":
            return choice  # decide on the model's first tensor file, not on its config.json
    cache[model] = choice
    return choice


def ingest_staged(ing: Ingester, sid: int, bases: dict[str, BaseChoice]) -> StagedIngest:
    """Ingest staged file sid; ZipfsError when it was removed meanwhile or cannot be read."""
    store = ing.store
    src = staging.staging_path(store, sid)
    with store.ingest_lock():
        with store.read() as txn:
            dest = staging.current_path(txn, store, sid)
        model = model_of(dest)
        choice = _base_for(ing, model, src, dest, bases)
        committed: list[str] = []

        def claim(txn: lmdb.Transaction) -> str:
            committed[:] = [staging.current_path(txn, store, sid)]
            return committed[0]

        lookup = choice.lookup if choice.name else None
        report = ing.ingest_file(src, dest, model=model, base_lookup=lookup, claim=claim)
    _record_model(ing, model_of(committed[0]), choice, report)
    return StagedIngest(report, committed[0], choice.name)


def _record_model(ing: Ingester, model: str, choice: BaseChoice, report: FileReport) -> None:
    """Create or update the model's record (base, sizes) as `zipfs ingest` would have written it."""
    store = ing.store

    def op(txn: lmdb.Transaction) -> None:
        db = store.db["models"]
        raw = txn.get(names.encode(model), db=db)
        rec = json.loads(bytes(raw)) if raw is not None else None
        if rec is None:
            if report.kind != "safetensors":
                return
            rec = {"base": choice.name, "reason": choice.reason, "ratio": choice.ratio,
                   "ingested": time.time(), "delta_chunks": 0}
        files = [store.file(txn, fid) for _, fid in store.stored_files(txn, model)]
        rec["size"] = sum(f.size for f in files)
        rec["new_bytes"] = sum(f.new_bytes for f in files)
        rec["delta_chunks"] = rec.get("delta_chunks", 0) + report.delta_chunks
        txn.put(names.encode(model), json.dumps(rec).encode(), db=db)

    store.writer.call(op)
