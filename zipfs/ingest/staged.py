"""Ingest one staged version (written through the mount) with the same pipeline as `zipfs ingest`.

The file's model is its directory, or the model or hub repo folder that directory is in
(models.home); the first weights file in it (or any file of a hub repo folder) makes it a model in
the models table, so stats and du list it. The first tensor file of a model chooses a base the way
`zipfs ingest` does (sampled delta coding against stored models); later files of that model
reuse the choice recorded in the models table. The commit switches the inode from the staged
version to the stored one only if the inode still shows exactly that version (not removed, not
superseded by a newer acknowledged version meanwhile); otherwise it is aborted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import lmdb

from zipfs.errors import ZipfsError
from zipfs.ingest.base import NO_TENSORS, BaseChoice, choose_base, stored_index
from zipfs.ingest.ingester import FileReport, Ingester
from zipfs.store import hub, inodes, journal, models
from zipfs.store.records import FileRecord

#: names of weight files in formats that are stored as opaque bytes (checkpoints, GGUF, ONNX, ...)
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack",
                   ".npz", ".tflite")


@dataclass
class StagedIngest:
    report: FileReport
    path: str  # where the file is now
    base: str | None


def _base_for(ing: Ingester, model: inodes.Inode, model_path: str, sid: int, name: str,
              cache: dict[int, BaseChoice]) -> BaseChoice:
    if model.ino in cache:
        return cache[model.ino]
    store = ing.store
    with store.read() as txn:
        known = models.get(store, txn, model.ino)
        base_node = inodes.find(store, txn, known.base) if known and known.base else None
        base = inodes.path_of(store, txn, base_node) if base_node is not None else None
    if base is not None:
        choice = BaseChoice(base, known.reason or "recorded", known.ratio or 1.0,
                            index=stored_index(store, base), chunk_size=ing.chunk_size)
    else:
        choice = choose_base(store, model_path, [(journal.staging_path(store, sid), name)], None,
                             chunk_size=ing.chunk_size)
        if choice.reason == NO_TENSORS:
            return choice  # decide on the model's first tensor file, not on its config.json
    cache[model.ino] = choice
    return choice


def ingest_staged(ing: Ingester, sid: int, ino: int, fd: int, size: int,
                  bases: dict[int, BaseChoice]) -> StagedIngest:
    """Ingest staged version sid of inode ino (read from fd, `size` acknowledged bytes);
    ZipfsError when the inode no longer shows it, or it cannot be read."""
    store = ing.store
    with store.ingest_lock():
        with store.read() as txn:
            node = inodes.get(store, txn, ino)
            if (node.content, node.content_id) != (inodes.STAGED, sid):
                raise ZipfsError(f"staged version #{sid} of inode {ino} was superseded")
            path = inodes.describe(store, txn, ino)
            model = models.home(store, txn, node)
            model_path = inodes.describe(store, txn, model.ino)
        choice = _base_for(ing, model, model_path, sid, path, bases)

        def commit(txn: lmdb.Transaction, fid: int, frec: FileRecord, rel: inodes.Released) -> None:
            now = inodes.find(store, txn, ino)
            row = journal.get(store, txn, sid)
            if (now is None or (now.content, now.content_id) != (inodes.STAGED, sid) or row is None
                    or row.state != journal.LIVE or row.size != frec.size):
                raise ZipfsError(f"{path}: removed or rewritten while being ingested")
            inodes.set_content(store, txn, now, inodes.STORED, fid, frec.size, rel)

        report = ing.ingest_file(fd, path, commit, base_lookup=choice.lookup if choice.name else None,
                                 size=size)
    founds = _carries_weights(path, report) or (model.is_dir and hub.repo_of(model_path) is not None)
    _record_model(ing, model.ino, choice, report, founds)
    return StagedIngest(report, path, choice.name)


def _carries_weights(path: str, report: FileReport) -> bool:
    """Whether a file is a model's weights (by its parsed format, or its name for formats stored
    as opaque bytes): the first one makes its directory a model, so a config or tokenizer file
    in a subdirectory copied before the weights does not."""
    return report.kind != "opaque" or path.lower().endswith(WEIGHT_SUFFIXES)


def _record_model(ing: Ingester, ino: int, choice: BaseChoice, report: FileReport, founds: bool) -> None:
    """Create (when founds) or update the model's record (its base, what was ingested into it)."""
    store = ing.store

    def op(txn: lmdb.Transaction) -> None:
        if inodes.find(store, txn, ino) is None:
            return
        m = models.get(store, txn, ino)
        if m is None:
            if not founds:
                return
            base = inodes.resolve(store, txn, choice.name).ino if choice.name else 0
            m = models.Model(ino, base, choice.reason, choice.ratio, time.time())
        m.size += report.size
        m.new_bytes += report.new_bytes
        m.delta_chunks += report.delta_chunks
        models.put(store, txn, m)

    store.writer.call(op)
