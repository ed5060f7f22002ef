"""Ingest a model (a directory or a single file) as one unit: choose its base, store every file,
record the model and its base (so a base others depend on is known)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from zipfs.errors import ZipfsError
from zipfs.ingest.base import BaseChoice, choose_base
from zipfs.ingest.ingester import FileReport, Ingester, iter_source_files
from zipfs.store import names


@dataclass
class ModelReport:
    name: str
    base: BaseChoice
    files: list[FileReport] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def new_bytes(self) -> int:
        return sum(f.new_bytes for f in self.files)


def plan_sources(src: Path, name: str | None) -> tuple[str, list[tuple[Path, str]]]:
    """The model name and (path on disk, name in store) of each file to ingest from src."""
    if not src.exists():
        raise ZipfsError(f"{src}: no such file or directory")
    model = names.normalize(name or src.resolve().name)
    if not model:
        raise ZipfsError("the store root cannot be a model name; pass --name")
    return model, [(f, f"{model}/{rel}" if rel else model) for f, rel in iter_source_files(src)]


def ingest_model(ing: Ingester, src: Path, name: str | None = None, base: str | None = None,
                 no_delta: bool = False, log: Callable[[str], None] = lambda _: None,
                 on_file: Callable[[FileReport], None] = lambda _: None) -> ModelReport:
    """Ingest src under `name`; each file commits on its own, the model record last."""
    model, files = plan_sources(src, name)
    choice = choose_base(ing.store, model, files, src if src.is_dir() else None, forced=base,
                         disabled=no_delta, chunk_size=ing.chunk_size, log=log)
    log(f"{model}: base {choice.name or '(none)'}: {choice.reason}")
    report = ModelReport(model, choice)
    lookup = choice.lookup if choice.name else None
    for f, dest in files:
        r = ing.ingest_file(f, dest, model=model, base_lookup=lookup)
        report.files.append(r)
        on_file(r)
    record = {"base": choice.name, "reason": choice.reason, "ratio": choice.ratio,
              "ingested": time.time(), "size": report.size, "new_bytes": report.new_bytes,
              "delta_chunks": sum(f.delta_chunks for f in report.files)}

    def op(txn: lmdb.Transaction) -> None:
        txn.put(names.encode(model), json.dumps(record).encode(), db=ing.store.db["models"])

    ing.store.writer.call(op)
    return report
