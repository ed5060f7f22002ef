"""Whole-file operations on top of the reader: verify against sha256, export to a directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zipfs.errors import ZipfsError
from zipfs.read.reader import FileLayout, Reader
from zipfs.store import names


@dataclass
class VerifyResult:
    name: str
    ok: bool
    message: str


def files_under(reader: Reader, prefix: str) -> list[tuple[str, FileLayout, str]]:
    """(path, layout, recorded sha256) of every file under prefix ('' = whole store)."""
    store = reader.store
    out = []
    with store.read() as txn:
        for path, fid in store.stored_files(txn, prefix):
            rec = store.file(txn, fid)
            out.append((path, FileLayout.of(rec), rec.sha256))
    return out


def verify(reader: Reader, prefixes: list[str]) -> Iterator[VerifyResult]:
    """Re-hash each file from its stored chunks and compare with the sha256 recorded at ingest."""
    for prefix in prefixes or [""]:
        for path, layout, sha in files_under(reader, prefix):
            h = hashlib.sha256()
            try:
                for block in reader.iter_file(layout):
                    h.update(block)
            except ZipfsError as e:
                yield VerifyResult(path, False, str(e))
                continue
            if h.hexdigest() != sha:
                yield VerifyResult(path, False, f"sha256 {h.hexdigest()} != recorded {sha}")
            else:
                yield VerifyResult(path, True, sha)


def export(reader: Reader, prefix: str, dest: Path) -> list[str]:
    """Write the files under prefix to dest (paths relative to prefix), each checked by sha256.

    A file is written to a temporary name and renamed when complete and verified, so an
    interrupted export never leaves a wrong file under its real name.
    """
    prefix = names.normalize(prefix)
    written = []
    for path, layout, sha in files_under(reader, prefix):
        rel = path[len(prefix):].lstrip("/") or path.rsplit("/", 1)[-1]
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.zipfs-tmp")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for block in reader.iter_file(layout):
                    h.update(block)
                    f.write(block)
            if h.hexdigest() != sha:
                raise ZipfsError(f"{path}: rebuilt bytes do not match the recorded sha256")
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written.append(str(target))
    return written
