"""A mount of a store with a remote: every few seconds, show the models other machines pushed
and push the models whose files this mount's background ingest stored."""

from __future__ import annotations

import logging
from functools import partial

import trio

from zipfs.errors import ZipfsError
from zipfs.fs.operations import Operations
from zipfs.remote import tables
from zipfs.remote.attach import Remote
from zipfs.remote.pull import sync
from zipfs.remote.push import push, push_removal
from zipfs.store import inodes, models

log = logging.getLogger("zipfs.remote")

#: seconds between two looks at the bucket
REFRESH = 3.0


def _model_paths(ops: Operations, inos: set[int]) -> set[str]:
    """The models of these inodes, marked in the store as changed here (kept by every sync,
    this mount's and a later one's, until pushed)."""
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
    if out:
        store.writer.call(lambda txn: [tables.forget_model_version(store, txn, n) for n in out])
    return out


def unpushed(ops: Operations) -> tuple[set[str], set[str]]:
    """Models here the bucket does not show as this store has them (changed here by this or an
    earlier mount, renamed here, an ingest whose push failed, a store that got its remote
    later): to be pushed; and models the bucket shows that are gone here (removed or renamed
    through the mount): to be published as removed."""
    store = ops.ns.store
    with store.read() as txn:
        here = models.named(store, txn)
        shown = tables.shown_models(store, txn)
        gone = set()
        for name, removed in shown.items():
            if not removed and name not in here:
                try:
                    inodes.resolve(store, txn, name)
                except ZipfsError:
                    gone.add(name)
        return {name for name in here if name not in shown}, gone


def _publish_removals(ops: Operations, remote: Remote, names: set[str]) -> None:
    for name in sorted(names):
        try:
            log.info("%s: removed here; published as removed (version %s)", name,
                     push_removal(ops.ns.store, remote, name))
        except ZipfsError as e:
            log.warning("%s: could not publish its removal (retrying): %s", name, e)


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
        idle = getattr(ops, "ingest_idle", True)
        if idle:  # pushed once all written is stored
            new, gone = await trio.to_thread.run_sync(unpushed, ops)
            pending |= new
            if gone:
                await trio.to_thread.run_sync(_publish_removals, ops, remote, gone)
        if pending and idle:
            pending = await trio.to_thread.run_sync(_push_all, ops, remote, pending)
        try:
            r = await trio.to_thread.run_sync(partial(sync, ops.ns.store, remote, keep=frozenset(pending)))
            if r.imported:
                log.info("from the bucket: %s", ", ".join(r.imported))
        except ZipfsError as e:
            log.warning("cannot look at the bucket (retrying): %s", e)
        except Exception:  # noqa: BLE001 - a bug costs this round, not what waits to be pushed
            log.exception("looking at the bucket failed")
        await trio.sleep(REFRESH)
