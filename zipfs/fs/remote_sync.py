"""A mount of a store with a remote: every few seconds, show the models other machines pushed
and push the models whose files this mount's background ingest stored."""

from __future__ import annotations

import logging
from functools import partial

import trio

from zipfs.errors import ZipfsError
from zipfs.fs.operations import Operations
from zipfs.remote.attach import Remote
from zipfs.remote.pull import sync
from zipfs.remote.push import push
from zipfs.store import inodes, models

log = logging.getLogger("zipfs.remote")

#: seconds between two looks at the bucket
REFRESH = 3.0


def _model_paths(ops: Operations, inos: set[int]) -> set[str]:
    store = ops.ns.store
    out = set()
    with store.read() as txn:
        for ino in inos:
            node = inodes.find(store, txn, ino)
            if node is not None and node.nlink:
                try:
                    out.add(inodes.path_of(store, txn, models.home(store, txn, node)))
                except ZipfsError:
                    continue
    return out


def _push_all(ops: Operations, remote: Remote, names: set[str]) -> set[str]:
    """Push each model; the names whose push failed (tried again next round)."""
    failed = set()
    for name in sorted(names):
        try:
            r = push(ops.ns.store, remote, name)
            log.info("%s: pushed version %s (%d chunks uploaded, %d bytes)", name, r.version,
                     r.uploaded_chunks, r.uploaded_bytes)
        except ZipfsError as e:
            log.warning("%s: push failed (retrying): %s", name, e)
            failed.add(name)
    return failed


async def refresh_loop(ops: Operations, remote: Remote) -> None:
    """Runs for the mount's lifetime; a server that is away costs a warning per round, not the
    mount. Models changed here are pushed before the bucket's are imported, and kept while
    their push fails: what a writer here was acknowledged is never replaced by another's."""
    pending: set[str] = set()
    while True:
        stored = getattr(ops, "stored_inos", None)
        if stored:
            inos = set(stored)
            stored.clear()
            pending |= await trio.to_thread.run_sync(_model_paths, ops, inos)
        if pending and getattr(ops, "ingest_idle", True):  # pushed once all written is stored
            pending = await trio.to_thread.run_sync(_push_all, ops, remote, pending)
        try:
            r = await trio.to_thread.run_sync(partial(sync, ops.ns.store, remote, keep=frozenset(pending)))
            if r.imported:
                log.info("from the bucket: %s", ", ".join(r.imported))
        except ZipfsError as e:
            log.warning("cannot look at the bucket (retrying): %s", e)
        await trio.sleep(REFRESH)
