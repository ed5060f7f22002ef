"""Reclaim LMDB free space: a compacting copy, then an atomic swap of the data file.

LMDB never shrinks its file; pages freed by rm + gc are reused but not returned. The copy
(mdb_env_copy2 with MDB_CP_COMPACT) writes only live pages; os.replace swaps it in atomically,
so a crash leaves either the old or the new file, both complete. Refused while mounted or
while anything else has the store open (open.lock): a process still mapping the old file would
write into a deleted one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import lmdb

from zipfs.errors import StoreError
from zipfs.store.lmdb_store import Store


@dataclass
class CompactResult:
    before: int
    after: int


def compact(path: Path) -> CompactResult:
    store = Store(path, create=False, exclusive=True)  # nothing else has the store open
    data = store.path / "lmdb" / "data.mdb"
    tmp = store.path / "lmdb.compact"
    try:
        before = data.stat().st_size
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        new = tmp / "data.mdb"
        try:
            store.check_tree()  # the copy walks every page
            store.env.copy(str(tmp), compact=True)
            with open(new, "rb") as f:
                os.fsync(f.fileno())
        except (lmdb.Error, OSError) as e:
            raise StoreError(f"compact failed, the store is unchanged: {e}") from None
        os.chmod(new, 0o600)
        store.close_environment()
        os.replace(new, data)
        dirfd = os.open(data.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return CompactResult(before, data.stat().st_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        store.close()
