"""Namespace changes made through the mount: mkdir, symlink, rename, copy-up, mtime.

Each function is one LMDB operation for the writer thread (`store.writer.call(op)`), so a change
is atomic and durable when it returns. They enforce what POSIX says (EEXIST, ENOTEMPTY, EISDIR,
EINVAL) with NamespaceError, which the mount turns into that errno.
"""

from __future__ import annotations

import errno
import json
import time
from collections import Counter
from collections.abc import Callable

import lmdb

from zipfs.errors import NamespaceError
from zipfs.store import names, staging
from zipfs.store.lifecycle import add_refs, drop
from zipfs.store.lmdb_store import Store
from zipfs.store.records import DIR, LINK, STAGED, NsEntry, ns_unpack, u64key

Op = Callable[[lmdb.Transaction], object]


def _get(txn: lmdb.Transaction, store: Store, path: str) -> NsEntry | None:
    if path == "":
        return NsEntry(DIR)
    raw = txn.get(names.encode(path), db=store.db["ns"])
    return ns_unpack(raw) if raw is not None else None


def mkdir(store: Store, path: str) -> Op:
    return lambda txn: staging.put_new(txn, store, path, NsEntry(DIR))


def symlink(store: Store, path: str, target: bytes) -> Op:
    return lambda txn: staging.put_new(txn, store, path, NsEntry(LINK, target=target))


def _is_empty_dir(txn: lmdb.Transaction, store: Store, path: str) -> bool:
    return next(iter(store.children(txn, path)), None) is None


def rename(store: Store, old: str, new: str, noreplace: bool, dead: list[int]) -> Op:
    """Move old (and everything under it) to new, replacing what new held as POSIX rename does.

    Staged files keep their staging id (only the journal's path changes); model records under a
    renamed directory move with it, and models naming it as their base follow.
    """
    def op(txn: lmdb.Transaction) -> None:
        dead.clear()
        src = _get(txn, store, old)
        if src is None:
            raise NamespaceError(errno.ENOENT, f"{old}: no such file or directory")
        if old == new:
            return
        if new.startswith(old + "/"):
            raise NamespaceError(errno.EINVAL, f"cannot move {old} into itself")
        dst = _get(txn, store, new)
        refs: Counter[int] = Counter()
        if dst is not None:
            if noreplace:
                raise NamespaceError(errno.EEXIST, f"{new}: already exists")
            if src.is_dir and not dst.is_dir:
                raise NamespaceError(errno.ENOTDIR, f"{new}: not a directory")
            if dst.is_dir and not src.is_dir:
                raise NamespaceError(errno.EISDIR, f"{new}: is a directory")
            if dst.is_dir and not _is_empty_dir(txn, store, new):
                raise NamespaceError(errno.ENOTEMPTY, f"{new}: directory not empty")
            drop(txn, store, new, dst, refs, dead)
            add_refs(txn, store, refs, sign=-1)
        staging.ensure_parents(txn, store, new)
        moves = [(old, src)] + (list(store.walk(txn, old)) if src.is_dir else [])
        for path, e in moves:
            to = new + path[len(old):]
            txn.delete(names.encode(path), db=store.db["ns"])
            txn.put(names.encode(to), e.pack(), db=store.db["ns"])
            if e.kind == STAGED:
                rec = staging.get(txn, store, e.id)
                if rec is not None:
                    rec.path = to
                    staging.put(txn, store, e.id, rec)
        _move_models(txn, store, old, new)

    return op


def _move_models(txn: lmdb.Transaction, store: Store, old: str, new: str) -> None:
    def moved(name: str | None) -> str | None:
        if name is not None and (name == old or name.startswith(old + "/")):
            return new + name[len(old):]
        return name

    db = store.db["models"]
    for name, rec in store.models(txn).items():
        if rec.get("base") and moved(rec["base"]) != rec["base"]:
            rec["base"] = moved(rec["base"])
            txn.put(names.encode(name), json.dumps(rec).encode(), db=db)
        if moved(name) != name:
            txn.delete(names.encode(name), db=db)
            txn.put(names.encode(moved(name)), json.dumps(rec).encode(), db=db)


def new_staging_id(store: Store) -> Op:
    return lambda txn: store.next_id(txn, staging.NEXT_SID)


def copy_up(store: Store, path: str, file_id: int, sid: int, size: int) -> Op:
    """Replace stored file `file_id` at path by staged file sid (already written and fsynced)."""
    def op(txn: lmdb.Transaction) -> None:
        if _get(txn, store, path) != NsEntry(b"F", file_id):
            raise NamespaceError(errno.ESTALE, f"{path}: changed while being opened for writing")
        drop(txn, store, path, NsEntry(b"F", file_id), refs := Counter(), [])
        add_refs(txn, store, refs, sign=-1)
        staging.put(txn, store, sid, staging.StagedRecord(path, size, True, time.time_ns()))
        txn.put(names.encode(path), NsEntry(STAGED, sid).pack(), db=store.db["ns"])
    return op


def set_mtime(store: Store, file_id: int, mtime_ns: int) -> Op:
    def op(txn: lmdb.Transaction) -> None:
        rec = store.file(txn, file_id)
        rec.mtime_ns = mtime_ns
        txn.put(u64key(file_id), rec.pack(), db=store.db["files"])
    return op

